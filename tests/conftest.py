"""With libtpu installed (the [tpu] extra, for the compile mode) on a machine without a TPU,
the test processes stay on the CPU without libtpu's start-up warnings, as the main job does.

The tests of one pytest run (its xdist workers and the command lines they start) share a JAX
compilation cache in a new folder of that run: the tiny model's train step, compiled by one
test, is read back by the next instead of compiled again (a new run starts empty, as CI does).
"""
import os
import shutil
import tempfile

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CACHE:  # the controller picks the folder; xdist's workers inherit the variable
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dinomaly_jax_test_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from dinomaly_jax import platforms  # pylint: disable=g-import-not-at-top,wrong-import-position  (after the cache's variables: jax reads them on import)

platforms.use_local_hardware_only()


def pytest_sessionfinish(session):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
