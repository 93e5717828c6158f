import os

# Four forced CPU devices so data-parallel code is exercised; must be set before JAX initialises.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
  """The uninterrupted tiny run (tests/tiny_run.py), in this process with its four CPU devices."""
  from hetlm_jax.main import cli
  from tiny_run import train_args, write_log
  root = tmp_path_factory.mktemp("tiny_reference")
  log = write_log(root / "log.parquet")
  assert cli(["hetlm", *train_args(log, root / "run")]) == 0
  return log, root / "run"
