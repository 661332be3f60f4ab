"""Checks that fail before step 0 instead of at the first evaluation or out of memory.

Batch sizes against the processes and their local devices (training and evaluation),
and the feature cache's host memory per process. Each error names the field to change.
(The encoder's identity against the work directory is checked by model_state.check_encoder.)
"""
import os

import jax
import ml_collections

from dinomaly_jax.errors import ConfigError
from dinomaly_jax.models import dinomaly
from dinomaly_jax.training import feature_cache

CACHE_MEMORY_FRACTION = 0.8  # of the host memory available at start-up


def local_device_count() -> int:
  return jax.local_device_count()


def check_batch(field: str, batch: int, process_count: int, local_devices: int) -> None:
  """A global batch must split evenly over processes, and each share over local devices."""
  per_process = batch // process_count
  if batch % process_count or per_process % local_devices:
    unit = process_count * local_devices
    raise ConfigError(
        f"config.{field}={batch} must be a multiple of {unit} ({process_count} processes x "
        f"{local_devices} devices per process) so that every device gets the same number of "
        f"images; use e.g. {max(unit, batch // unit * unit)}.")


def check_batches(config: ml_collections.ConfigDict, process_count: int, local_devices: int,
                  train: bool) -> None:
  if train:
    check_batch("train.batch_size", config.train.batch_size, process_count, local_devices)
  check_batch("eval.batch_size", config.eval.batch_size, process_count, local_devices)


def available_host_memory() -> int:
  """Bytes of memory available to new allocations on this host (MemAvailable)."""
  try:
    with open("/proc/meminfo") as f:
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
  """Every check of a training run, before the model is built."""
  n_proc = jax.process_count()
  check_batches(config, n_proc, local_device_count(), train=True)
  check_cache_memory(config, num_train_images, n_proc, available_host_memory())


def check_evaluation(config: ml_collections.ConfigDict) -> None:
  check_batches(config, jax.process_count(), local_device_count(), train=False)
