import os

# Four forced CPU devices so data-parallel code is exercised; must be set before JAX initialises.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (hetlm_jax/compilation.py), shared by the test process and the
# `hetlm` processes the tests start: the many tiny runs compile the same programs once.
if "HETLM_COMPILATION_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["HETLM_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="hetlm_test_cache_")
  atexit.register(shutil.rmtree, os.environ["HETLM_COMPILATION_CACHE"], ignore_errors=True)


import pytest

from hetlm_jax import compilation

compilation.setup()  # library calls in the tests use it too, not only `hetlm` commands


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
  """The uninterrupted tiny run (tests/tiny_run.py), in this process with its four CPU devices."""
  from tiny_run import train_args, write_log

  from hetlm_jax.main import cli

  root = tmp_path_factory.mktemp("tiny_reference")
  log = write_log(root / "log.parquet")
  assert cli(["hetlm", *train_args(log, root / "run")]) == 0
  return log, root / "run"
