"""Training steps with data loading: the image pipeline vs cached encoder features.

The train-step figures of run.py feed one batch already in memory; here every step
takes its batch from the real input path: PNG files decoded, resized and cropped by
the grain pipeline (config.data.workers processes), or rows of the feature cache.
"""
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from dinomaly_jax import sharding
from dinomaly_jax.data import pipeline
from dinomaly_jax.data.records import Record
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import train_step

IMAGE_SIDE = 1024  # MVTec-AD images are 700 to 1024 pixels square PNGs


def write_images(root: str, count: int, seed: int = 0) -> list[Record]:
  """`count` noisy gradient PNGs (IMAGE_SIDE square) and their records."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 200, IMAGE_SIDE, dtype=np.float32)
  records = []
  for i in range(count):
    base = ramp[None, :, None] * rng.uniform(0.3, 1.0, 3) + ramp[:, None, None] * 0.2
    noise = rng.normal(0, 12, (IMAGE_SIDE, IMAGE_SIDE, 3))
    path = os.path.join(root, f"{i:04d}.png")
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    records.append(Record(path, "synthetic", 0, "good", None))
  return records


def _seconds_per_step(step_fn, batches, state, mesh, steps: int):
  state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))  # compile, warm up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def bench(jm, steps: int) -> dict:
  """Seconds per step from PNG files and from the cache, and the cache's build time."""
  config, mesh = jm.config, jm.mesh
  batch = config.train.batch_size
  with tempfile.TemporaryDirectory() as root:
    records = write_images(root, 2 * batch)  # two batches per epoch
    images = pipeline.train_iterator(records, config.data, batch_size=batch, seed=config.seed)
    uncached_step = train_step.make_train_step(jm.model, config, mesh)
    uncached = _seconds_per_step(uncached_step, images, jm.fresh_state(), mesh, steps)
    del images
    start = time.perf_counter()
    features, cached_step = feature_cache.cached_training(config, jm.model,
                                                          jm.state.encoder_params, records, mesh)
    build = time.perf_counter() - start
    cached = _seconds_per_step(cached_step, features, jm.fresh_state(), mesh, steps)
  return {"images_s": uncached, "cached_s": cached, "cache_build_s": build,
          "cache_images": len(records), "speedup": uncached / cached}
