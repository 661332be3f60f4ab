"""A Google Cloud Storage emulator on 127.0.0.1 for tests, and the environment pointing
every client at it: gcsfs (etils.epath, so the package's file layer), tensorstore
(orbax's array data) and google-cloud-storage.

  with object_store.gcs_emulator() as env:  # env: the variables to set in the tests' processes
    ... gs://test-bucket/... ...
"""
import contextlib
import os
import subprocess
import sys
import time
import urllib.request

import portpicker

BUCKET = "test-bucket"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client_env(url: str) -> dict:
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs kvstore (orbax checkpoints)
      "TENSORSTORE_GCS_HTTP_VERSION": "1",  # the emulator speaks HTTP/1.1
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout lookup (needs credentials)
      "GOOGLE_CLOUD_PROJECT": "test",
  }


@contextlib.contextmanager
def gcs_emulator():
  """Starts the GCS emulator (tests/gcs_emulator.py, bucket BUCKET); yields the clients' environment."""
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1)
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError("the GCS emulator did not start") from None
        time.sleep(0.1)
    yield client_env(url)
  finally:
    proc.terminate()
    proc.wait(timeout=10)


@contextlib.contextmanager
def environment(env: dict):
  """Sets `env` in this process for the duration (clients read it when they first connect)."""
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
