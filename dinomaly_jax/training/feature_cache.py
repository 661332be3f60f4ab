"""Cached encoder features: encode every training image once, then train from the cache.

With no augmentation and a frozen encoder, an image's bottleneck input (mean of the
target layers over all tokens, (N, D)) and its group targets (one (h, w, D) map per
fuse group) never change. `config.data.cache_features` computes them once, keeps them
in host memory in `config.data.cache_dtype` (bfloat16 by default: half the memory,
about 3 significant digits; float32 reproduces the uncached run to float noise), and
trains the bottleneck and decoder from them through the train step's `from_features`
path, batch for batch in the same shuffled order as the image pipeline.

Sharded over hosts: each process keeps only the rows it encoded (`owned_rows`: with
global batch G = B x P, row r belongs to process (r mod G) // B), about 1/P of the
cache. At each step every process uploads only the rows it holds of the global batch: a
(K, ...) block and their positions in the batch (-1: padding), K the most rows any process
holds in any step of the epoch (`upload_rows`, about G/P: every host computes it alike from
the shuffled order, no communication); `place` scatters the P blocks on the devices into
the global batch split on "data". So the batches are the image pipeline's, exactly, for any
number of processes, and the host-to-device traffic per process falls with P.
"""
import itertools

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dinomaly_jax import compiler_options
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


def bytes_per_image(shapes: dict, dtype) -> int:
  return sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=_is_shape)) * np.dtype(dtype).itemsize


def rows_per_process(num_images: int, batch_size: int, process_count: int) -> int:
  """Rows each process holds: B per global batch, the last one padded (batch_size per process)."""
  return -(-num_images // (batch_size * process_count)) * batch_size


def describe(num_images: int, shapes: dict, dtype, *, batch_size: int = 1,
             process_count: int = 1) -> str:
  """One line with the cache's size per host, e.g. 'caching 1,234 images x ... = 3.2 GiB'."""
  rows = rows_per_process(num_images, batch_size, process_count)
  total = rows * bytes_per_image(shapes, dtype)
  groups = shapes["enc_groups"]
  parts = " + ".join(["x".join(map(str, shapes["bottleneck_input"])) + " bottleneck input",
                      f"{len(groups)} x " + "x".join(map(str, groups[0])) + " group targets"])
  share = f" ({rows:,} rows: this process's share of {process_count})" if process_count > 1 else ""
  return (f"Caching encoder features: {num_images:,} images x ({parts}) in "
          f"{np.dtype(dtype).name} = {total / 2**30:.2f} GiB of host memory per process{share}.")


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def owned_rows(num_images: int, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> np.ndarray:
  """The row ids process p holds, in its storage order (-1: padding past the last image).

  Row r of global batch g = r // G sits at position r mod G; the devices of process
  (r mod G) // B encode it, so that process keeps it.
  """
  g = np.arange(rows_per_process(num_images, batch_size, process_count) // batch_size)
  rows = (g[:, None] * batch_size * process_count + process_index * batch_size
          + np.arange(batch_size)[None, :]).reshape(-1)
  return np.where(rows < num_images, rows, -1)


def build_cache(model: Dinomaly, encoder_params, records, data_config, mesh, *, batch_size: int,
                process_index: int = 0, process_count: int = 1) -> dict:
  """Encodes every record once, in order; each process keeps the rows it encoded.

  batch_size is the per-process batch: process p encodes rows [p*B, (p+1)*B) of each
  global batch. Returns {"bottleneck_input": (m, N, D), "enc_groups": [(m, h, w, D), ...]}
  numpy arrays in data_config.cache_dtype, m = rows_per_process (rows in `owned_rows` order).
  """
  dtype = cache_dtype(data_config.cache_dtype)
  sizes = transforms.Sizes.of(data_config)
  shapes = feature_shapes(model, (sizes.crop, sizes.crop))
  if process_index == 0:
    print(describe(len(records), shapes, dtype, batch_size=batch_size, process_count=process_count),
          flush=True)
  positions = owned_rows(len(records), batch_size, process_index, process_count)
  cache = jax.tree.map(lambda s: np.empty((len(positions), *s), dtype), shapes, is_leaf=_is_shape)
  reader = pipeline.make_reader(records, data_config)
  blank = np.zeros((sizes.crop, sizes.crop, 3), np.float32)
  load = lambda i: (transforms.normalize_crop(reader.image(int(i)), sizes.crop) if i >= 0 else blank)
  images = (grain.MapDataset.source(list(positions)).map(load).batch(batch_size)
            .to_iter_dataset(grain.ReadOptions(num_threads=pipeline.IN_PROCESS_THREADS,
                                               prefetch_buffer_size=2)))
  encode = jax.jit(lambda p, x: model.apply({"params": {"encoder": p}}, x, method=Dinomaly.encode),
                   compiler_options=compiler_options.heavy_jit_options())
  for g, batch in enumerate(images):
    bottleneck_input, enc_groups = encode(encoder_params,
                                          sharding.global_batch({"x": batch}, mesh, "train.batch_size")["x"])
    rows = jax.tree.map(lambda x: _local_rows(x, process_index, batch_size).astype(dtype),
                        {"bottleneck_input": bottleneck_input, "enc_groups": enc_groups})
    for cached, new_rows in zip(jax.tree.leaves(cache), jax.tree.leaves(rows)):
      cached[g * batch_size:(g + 1) * batch_size] = new_rows
  return cache


def _local_rows(x: jax.Array, process_index: int, batch_size: int) -> np.ndarray:
  """This process's rows of a global array split on its leading axis, in order: rows
  [p*B, (p+1)*B), which the cache's row ownership assumes (checked: the mesh must hold each
  process's devices together, in process order, as sharding.make_mesh does)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  bounds = [(s.index[0].start or 0, (s.index[0].start or 0) + s.data.shape[0]) for s in shards]
  rows = np.concatenate([np.asarray(s.data) for s in shards])
  together = all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
  if not together or bounds[0][0] != process_index * batch_size or len(rows) != batch_size:
    raise RuntimeError(f"feature cache: process {process_index} holds rows {bounds} "
                       f"({len(rows)} rows) of the global batch, not [{process_index * batch_size}, "
                       f"{(process_index + 1) * batch_size}); the mesh must keep each process's "
                       "devices together in process order (sharding.make_mesh).")
  return rows


def holders(rows: np.ndarray, batch_size: int, process_count: int) -> np.ndarray:
  """The process that holds each row id (`owned_rows`): (r mod G) // B, G = B x P."""
  return (np.asarray(rows) % (batch_size * process_count)) // batch_size


def upload_rows(steps: np.ndarray, batch_size: int, process_count: int, multiple: int = 1) -> int:
  """K: the most rows any process holds in any of the global batches `steps` ((S, G) row ids),
  rounded up to a multiple of `multiple` (the local devices, which split it). The same on
  every process."""
  held = holders(steps, batch_size, process_count)  # (S, G)
  counts = (held[..., None] == np.arange(process_count)).sum(1)  # (S, P)
  return -(-int(counts.max()) // multiple) * multiple


def cached_batches(cache: dict, *, num_images: int, batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0, process_count: int = 1,
                   multiple: int = 1):
  """Endless uploads {"rows": (K, ...) tree, "positions": (K,) int32}, in the order of
  pipeline.train_iterator (a seeded shuffle of all rows per epoch, global batches of
  G = batch_size x process_count, remainder dropped): the rows of each global batch that this
  process holds and their positions in it, padded to K rows (zeros, position -1). K is
  upload_rows over the epoch's steps (never smaller than before; `multiple`: the local
  devices). `place` makes the P uploads the global batch."""
  global_batch = batch_size * process_count
  order = (grain.MapDataset.range(num_images).shuffle(seed=seed % 2**32)
           .batch(global_batch, drop_remainder=True).repeat())[start_step:]
  slot = np.full(num_images, -1)  # row id -> its index in this process's cache
  held = owned_rows(num_images, batch_size, process_index, process_count)
  slot[held[held >= 0]] = np.nonzero(held >= 0)[0]
  epoch = max(1, num_images // global_batch)  # steps
  k = 0
  for first in itertools.count(0, epoch):
    steps = np.stack([np.asarray(order[first + i]) for i in range(epoch)])  # (S, G) row ids
    k = max(k, upload_rows(steps, batch_size, process_count, multiple))
    for ids in steps:
      positions = np.nonzero(holders(ids, batch_size, process_count) == process_index)[0]  # (n <= K,)
      rows = slot[ids[positions]]

      def block(c, rows=rows):
        out = np.zeros((k, *c.shape[1:]), c.dtype)
        out[:len(rows)] = c[rows]
        return out

      padded = np.full(k, -1, np.int32)
      padded[:len(positions)] = positions
      yield {"rows": jax.tree.map(block, cache), "positions": padded}


def make_place(mesh, global_batch: int):
  """jit: the processes' uploads (cached_batches), as global arrays ((P*K, ...) rows and (P*K,)
  positions split on "data"), -> the global batch (G, ...) in float32 split on "data": each row
  scattered to its position, padding dropped (exact: every position gets one row)."""
  out = sharding.data_sharding(mesh)

  @jax.jit
  def place(upload):
    positions = upload["positions"]
    target = jnp.where(positions >= 0, positions, global_batch)  # padding: past the end, dropped

    def one(x):
      batch = jnp.zeros((global_batch, *x.shape[1:]), jnp.float32)
      return jax.lax.with_sharding_constraint(batch.at[target].set(x.astype(jnp.float32), mode="drop"), out)

    return jax.tree.map(one, upload["rows"])

  return place


def one_process_upload(features: dict) -> dict:
  """One process's whole (G, ...) feature batch as the upload make_place takes (rows in order)."""
  return {"rows": features, "positions": np.arange(len(features["bottleneck_input"]), dtype=np.int32)}


def cached_training(config, model: Dinomaly, encoder_params, records, mesh, start_step: int = 0):
  """(batches, step_fn) to use in place of the image pipeline and the image train step.

  batches yields this process's host-local uploads (its (K, ...) rows of each global batch
  and their positions; pass them through sharding.global_batch like image batches);
  step_fn(state, global_uploads) places them into the float32 global batch on the devices
  and runs the from_features train step.
  """
  n_proc, p_index = jax.process_count(), jax.process_index()
  local_batch = config.train.batch_size // n_proc
  if len(records) < config.train.batch_size:
    raise DataError(f"{len(records)} training images are fewer than one global batch of "
                    f"{config.train.batch_size}; use a smaller config.train.batch_size.")
  cache = build_cache(model, encoder_params, records, config.data, mesh, batch_size=local_batch,
                      process_index=p_index, process_count=n_proc)
  batches = cached_batches(cache, num_images=len(records), batch_size=local_batch, seed=config.seed,
                           start_step=start_step, process_index=p_index, process_count=n_proc,
                           multiple=jax.local_device_count())
  return batches, make_cached_step(model, config, mesh)


def make_cached_step(model: Dinomaly, config, mesh):
  """step_fn(state, global_uploads): places the processes' uploaded rows into the float32
  global batch on the devices and runs the from_features train step (optimizer from config.train)."""
  step = train_step.make_train_step(model, config, mesh, from_features=True)
  place = make_place(mesh, config.train.batch_size)
  return lambda state, upload: step(state, place(upload))
