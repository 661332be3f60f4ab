"""Checks that fail before step 0 instead of at the first evaluation or out of memory.

The training batch against the processes and their local devices (and evaluation's own
input checks, for the evaluation at the end), and the feature cache's host memory per
process. Each error names the field to change.
(The encoder's identity against the work directory is checked by model_state.check_encoder.)
"""
import os

import jax
import ml_collections

from dinomaly_jax import sharding
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.models import dinomaly
from dinomaly_jax.training import feature_cache

CACHE_MEMORY_FRACTION = 0.8  # of the host memory available at start-up


def available_host_memory() -> int:
  """Bytes of memory available to new allocations on this host (MemAvailable)."""
  try:
    with open("/proc/meminfo") as f:  # host-local: this host's memory
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_memory(config: ml_collections.ConfigDict, num_images: int, process_count: int,
                       available: int) -> None:
  """The feature cache's share on this host must fit in CACHE_MEMORY_FRACTION of `available`."""
  if not config.data.cache_features:
    return
  model = dinomaly.build_model(config.model)
  shapes = feature_cache.feature_shapes(model, (config.data.crop, config.data.crop))
  dtype = feature_cache.cache_dtype(config.data.cache_dtype)
  per_process = config.train.batch_size // process_count
  rows = feature_cache.rows_per_process(num_images, per_process, process_count)
  needed = rows * feature_cache.bytes_per_image(shapes, dtype)
  if needed > CACHE_MEMORY_FRACTION * available:
    raise ConfigError(
        f"config.data.cache_features: the cache needs {needed / 2**30:.2f} GiB per process "
        f"({rows:,} of {num_images:,} images in {dtype.name}) but this host has "
        f"{available / 2**30:.2f} GiB available; set config.data.cache_features=False, "
        "config.data.cache_dtype='bfloat16', or run on more hosts.")


def check_training(config: ml_collections.ConfigDict, num_train_images: int) -> None:
  """Every check of a training run, before the model is built (the evaluation at its end too)."""
  n_proc = jax.process_count()
  sharding.check_batch("train.batch_size", config.train.batch_size, n_proc, jax.local_device_count())
  evaluate.check_inputs(config)
  check_cache_memory(config, num_train_images, n_proc, available_host_memory())
