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


import socket
import subprocess
import sys
import time

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


@pytest.fixture(scope="session")
def s3_endpoint():
  """moto's S3 server on 127.0.0.1 (a free port), with test credentials, its endpoint and a region in the environment
  (as the AWS SDKs read them: s3fs, pyarrow, tensorboardX and the checkpoints' TensorStore all take them from
  there); yields HOST:PORT."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      time.sleep(0.1)
  settings = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    "AWS_REGION": "us-east-1",
  }
  old = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  yield f"127.0.0.1:{port}"
  server.terminate()
  server.wait(10)
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
