"""grain pipelines: endless shuffled training batches and padded, sharded evaluation batches.

Training: a seeded shuffle of all records that changes each epoch, cut into global batches
(dropping each epoch's remainder, the reference's drop_last), repeated forever; process p
decodes, resizes, centre-crops and normalises its slice [p*B, (p+1)*B) of each global batch.
So the global batches are the same for any number of processes and workers, and
`start_step` skips that many batches in O(1) to resume exactly.

Evaluation runs in this process with threads (PIL decodes and resizes without holding the
GIL): worker processes would start once per class, which costs more than a class's test
set takes to read. Global batch g holds records [g*B*P, (g+1)*B*P) (B per-process batch, P
processes); process p gets its slice [p*B, (p+1)*B) of it, padded past the end with
valid=False, so that every process yields num_eval_batches batches and every record is
scored once.
"""
import os
import signal
import weakref

from absl import flags
import grain
import numpy as np

from dinomaly_jax.data import packed
from dinomaly_jax.data import transforms
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

WORKER_THREADS = 2  # batches decoded at once in each worker process
IN_PROCESS_THREADS = min(16, os.cpu_count() or 1)  # ... without worker processes


class FolderReader:
  """Reads records from their image files: (resize, resize) uint8 images and masks."""

  def __init__(self, records: list[Record], sizes: transforms.Sizes,
               decoding: transforms.Decoding = transforms.Decoding()):
    self._paths = [(r.image_path, r.mask_path) for r in records]
    self._resize = sizes.resize
    self._decoding = decoding

  def image(self, i: int) -> np.ndarray:  # (R, R, 3) uint8
    return transforms.resize_image(transforms.load_image(self._paths[i][0], self._decoding), self._resize)

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # (R, R, 3), (R, R) uint8
    return transforms.load_resized(*self._paths[i], self._resize, self._decoding)


def make_reader(records: list[Record], data_config):
  """The packed reader when data_config.packed is set, else the folder reader."""
  sizes = transforms.Sizes.of(data_config)
  if data_config.packed:
    return packed.PackedReader(data_config.packed, records, sizes)
  return FolderReader(records, sizes, transforms.Decoding.of(data_config))


class _TrainBatch:
  """Record positions of one global batch -> this process's {"image": (b, crop, crop, 3)}."""

  def __init__(self, reader, sizes: transforms.Sizes, start: int, size: int):
    self._reader, self._crop, self._start, self._size = reader, sizes.crop, start, size

  def __call__(self, positions):
    mine = positions[self._start:self._start + self._size]
    return {"image": np.stack([transforms.normalize_crop(self._reader.image(int(i)), self._crop)
                               for i in mine])}


class _AugmentedTrainBatch(_TrainBatch):
  """(global step, record positions) -> this process's augmented batch (data.augment). Image j
  of step t draws from default_rng([seed, t, j]), j its place in the global batch, so the
  batches do not depend on the number of processes or workers, and resume exactly."""

  def __init__(self, reader, sizes: transforms.Sizes, start: int, size: int, seed: int):
    super().__init__(reader, sizes, start, size)
    self._seed = seed

  def __call__(self, step, positions):
    mine = positions[self._start:self._start + self._size]
    return {"image": np.stack([
        transforms.augment_crop(self._reader.image(int(i)), self._crop,
                                np.random.default_rng([self._seed, int(step), self._start + j]))
        for j, i in enumerate(mine)])}


class _EvalExample:
  """Position in the records (or past the end: padding) -> one eval example."""

  def __init__(self, reader, labels: list[int], sizes: transforms.Sizes):
    self._reader, self._labels, self._sizes = reader, labels, sizes

  def __call__(self, k):
    s, k = self._sizes, int(k)
    if k >= len(self._labels):
      return {"image": np.zeros((s.crop, s.crop, 3), np.float32),
              "mask": np.zeros((s.mask_size, s.mask_size), np.uint8),
              "label": np.int32(0), "index": np.int32(-1), "valid": np.bool_(False)}
    image, mask = self._reader.example(k)
    return {"image": transforms.normalize_crop(image, s.crop),
            "mask": transforms.finish_mask(mask, s.crop, s.mask_size),
            "label": np.int32(self._labels[k]), "index": np.int32(k), "valid": np.bool_(True)}


def _yield_from(iterator):
  """Each element as plain numpy arrays, so that no array handed on (to jax, which may
  alias host memory) keeps a worker's shared-memory block alive past the iterator."""
  try:
    for element in iterator:
      yield {k: np.array(v) for k, v in element.items()}
  finally:
    iterator.close()


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """In each worker process: Ctrl-C reaches the whole process group, and the main
  process (which stops training cleanly and closes the workers) handles it."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _iterate(ds: grain.MapDataset, workers: int):
  """Iterates ds in `workers` processes (0 = this one); closes them when the generator is
  closed (`.close()`), dropped, or at exit."""
  iterator = iter(_prefetched(ds, workers))
  wrapper = _yield_from(iterator)
  weakref.finalize(wrapper, iterator.close)
  return wrapper


def _prefetched(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
  threads = WORKER_THREADS if workers else IN_PROCESS_THREADS
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use their defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                        worker_init_fn=_ignore_sigint)
  return it


def train_iterator(records: list[Record], data_config, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, workers: int | None = None,
                   start_step: int = 0):
  """Endless iterator of {"image": float32 (batch_size, crop, crop, 3)} for this process.

  Args:
    records: all training records (every process passes the same list).
    data_config: config.data (sizes, workers, packed).
    batch_size: the per-process batch (global batch // process_count).
    seed: shuffle seed, the same on every process.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    workers: grain worker processes; None = data_config.workers, 0 = in-process threads.
    start_step: number of batches to skip (resuming from a checkpoint).
  """
  global_batch = batch_size * process_count
  if len(records) < global_batch:
    raise DataError(f"{len(records)} training images are fewer than one global batch of "
                    f"{global_batch} ({process_count} processes x {batch_size}); use a smaller "
                    "config.train.batch_size.")
  ds = (grain.MapDataset.range(len(records))
        .shuffle(seed=seed % 2**32)
        .batch(global_batch, drop_remainder=True)
        .repeat())
  reader, sizes = make_reader(records, data_config), transforms.Sizes.of(data_config)
  if data_config.augment:  # the step (index before the resume slice) seeds each image's draw
    ds = ds.map_with_index(_AugmentedTrainBatch(reader, sizes, process_index * batch_size, batch_size,
                                                seed % 2**32))[start_step:]
  else:
    ds = ds[start_step:].map(_TrainBatch(reader, sizes, process_index * batch_size, batch_size))
  workers = data_config.workers if workers is None else workers
  return _iterate(ds, workers)


def num_eval_batches(n_records: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields to cover n_records with per-process batch_size."""
  return -(-n_records // (batch_size * process_count))


def eval_iterator(records: list[Record], data_config, *, batch_size: int,
                  process_index: int = 0, process_count: int = 1):
  """Finite iterator of this process's eval batches (see the module docstring).

  Yields {"image": float32 (B, crop, crop, 3), "mask": uint8 (B, mask_size, mask_size) levels
  (transforms.MASK_HALF), "label": int32 (B,), "index": int32 (B,) position in `records` (-1 for padding),
  "valid": bool (B,)}.
  """
  n_batches = num_eval_batches(len(records), batch_size, process_count)
  stride = batch_size * process_count
  positions = [g * stride + process_index * batch_size + j
               for g in range(n_batches) for j in range(batch_size)]
  sizes = transforms.Sizes.of(data_config)
  example = _EvalExample(make_reader(records, data_config), [r.label for r in records], sizes)
  ds = grain.MapDataset.source(positions).map(example).batch(batch_size)
  return _iterate(ds, 0)
