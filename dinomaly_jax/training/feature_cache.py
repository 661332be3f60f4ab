"""Cached encoder features: encode every training image once, then train from the cache.

With no augmentation and a frozen encoder, an image's bottleneck input (mean of the
target layers over all tokens, (N, D)) and its group targets (one (h, w, D) map per
fuse group) never change. `config.data.cache_features` computes them once, keeps them
in host memory (all rows on every process) in `config.data.cache_dtype` (bfloat16 by default: half the memory,
about 3 significant digits; float32 reproduces the uncached run to float noise), and
trains the bottleneck and decoder from them through the train step's `from_features`
path, batch for batch in the same shuffled order as the image pipeline.
"""
import itertools

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dinomaly_jax import sharding
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import transforms
from dinomaly_jax.errors import DataError
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.training import train_step

CACHE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def cache_dtype(name: str):
  if name not in CACHE_DTYPES:
    raise ValueError(f"data.cache_dtype={name!r}; expected one of {sorted(CACHE_DTYPES)}.")
  return np.dtype(CACHE_DTYPES[name])


def feature_shapes(model: Dinomaly, image_hw) -> dict:
  """Per-image shapes: {"bottleneck_input": (N, D), "enc_groups": [(h, w, D), ...]}."""
  h, w = image_hw[0] // model.encoder.patch_size, image_hw[1] // model.encoder.patch_size
  dim = model.encoder.embed_dim
  prefix = 0 if model.conv_decoder_kernel > 0 else 1 + model.encoder.num_registers
  return {"bottleneck_input": (prefix + h * w, dim),
          "enc_groups": [(h, w, dim)] * len(model.fuse_groups)}


def describe(num_images: int, shapes: dict, dtype) -> str:
  """One line with the cache's size, e.g. 'caching 1,234 images x ... = 3.2 GiB'."""
  per_image = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))
  total = num_images * per_image * np.dtype(dtype).itemsize
  groups = shapes["enc_groups"]
  parts = " + ".join(["x".join(map(str, shapes["bottleneck_input"])) + " bottleneck input",
                      f"{len(groups)} x " + "x".join(map(str, groups[0])) + " group targets"])
  return (f"Caching encoder features: {num_images:,} images x ({parts}) in "
          f"{np.dtype(dtype).name} = {total / 2**30:.2f} GiB of host memory per process.")


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def to_host(features, dtype_name: str):
  """Pytree of global arrays -> every row, on every process, as numpy in the cache dtype."""
  dtype = cache_dtype(dtype_name)
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)).astype(dtype),
      features)


def build_cache(model: Dinomaly, encoder_params, records, data_config, mesh, *, batch_size: int,
                process_index: int = 0, process_count: int = 1) -> dict:
  """Encodes every record once, in order; every process keeps every row (the image
  pipeline may hand any record to any process).

  batch_size is the per-process batch: process p encodes rows [p*B, (p+1)*B) of each
  global batch. Returns {"bottleneck_input": (n, N, D), "enc_groups": [(n, h, w, D), ...]}
  numpy arrays in data_config.cache_dtype.
  """
  dtype = cache_dtype(data_config.cache_dtype)
  sizes = transforms.Sizes.of(data_config)
  shapes = feature_shapes(model, (sizes.crop, sizes.crop))
  print(describe(len(records), shapes, dtype), flush=True)
  cache = jax.tree.map(lambda s: np.empty((len(records), *s), dtype), shapes, is_leaf=_is_shape)

  global_batch = batch_size * process_count
  num_batches = -(-len(records) // global_batch)  # the last one padded with blank images
  positions = [g * global_batch + process_index * batch_size + j
               for g in range(num_batches) for j in range(batch_size)]
  reader = pipeline.make_reader(records, data_config)
  blank = np.zeros((sizes.crop, sizes.crop, 3), np.float32)
  load = lambda i: (transforms.normalize_crop(reader.image(int(i)), sizes.crop)
                    if i < len(records) else blank)
  images = (grain.MapDataset.source(positions).map(load).batch(batch_size)
            .to_iter_dataset(grain.ReadOptions(num_threads=pipeline.IN_PROCESS_THREADS,
                                               prefetch_buffer_size=2)))
  encode = jax.jit(lambda p, x: model.apply({"params": {"encoder": p}}, x, method=Dinomaly.encode))
  for g, batch in enumerate(images):
    bottleneck_input, enc_groups = encode(encoder_params,
                                          sharding.global_batch({"x": batch}, mesh)["x"])
    rows = to_host({"bottleneck_input": bottleneck_input, "enc_groups": enc_groups},
                   data_config.cache_dtype)
    start = g * global_batch
    stop = min(start + global_batch, len(records))
    for cached, new_rows in zip(jax.tree.leaves(cache), jax.tree.leaves(rows)):
      cached[start:stop] = new_rows[:stop - start]
  return cache


def cached_batches(cache: dict, *, batch_size: int, seed: int, start_step: int = 0,
                   process_index: int = 0, process_count: int = 1):
  """Endless per-process batches of cached rows, in the order of pipeline.train_iterator:
  a seeded shuffle of all rows per epoch, global batches (remainder dropped), process p
  taking rows [p*B, (p+1)*B) of each."""
  num = cache["bottleneck_input"].shape[0]
  order = (grain.MapDataset.range(num).shuffle(seed=seed % 2**32)
           .batch(batch_size * process_count, drop_remainder=True).repeat())[start_step:]
  mine = slice(process_index * batch_size, (process_index + 1) * batch_size)
  for step in itertools.count():
    rows = np.asarray(order[step])[mine]
    yield jax.tree.map(lambda c, rows=rows: c[rows], cache)


@jax.jit
def to_float32(batch):
  return jax.tree.map(lambda x: x.astype(jnp.float32), batch)


def cached_training(config, model: Dinomaly, encoder_params, records, mesh, start_step: int = 0):
  """(batches, step_fn) to use in place of the image pipeline and the image train step.

  batches yields this process's host-local feature batches (pass them through
  sharding.global_batch like image batches); step_fn(state, global_batch) casts them
  to float32 on the device and runs the from_features train step.
  """
  n_proc, p_index = jax.process_count(), jax.process_index()
  local_batch = config.train.batch_size // n_proc
  if len(records) < config.train.batch_size:
    raise DataError(f"{len(records)} training images are fewer than one global batch of "
                    f"{config.train.batch_size}; use a smaller config.train.batch_size.")
  cache = build_cache(model, encoder_params, records, config.data, mesh, batch_size=local_batch,
                      process_index=p_index, process_count=n_proc)
  batches = cached_batches(cache, batch_size=local_batch, seed=config.seed, start_step=start_step,
                           process_index=p_index, process_count=n_proc)
  step = train_step.make_train_step(model, config, mesh, from_features=True)
  return batches, lambda state, batch: step(state, to_float32(batch))
