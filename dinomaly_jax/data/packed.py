"""Packed datasets: records -> one TFDS array_record dataset, and a reader for it.

Thousands of small image files on cloud storage starve a pod; a few large array_record
shards do not. Images are stored resized to data.resize (PNG, lossless) and masks resized
the same way as mask levels (transforms.resize_mask: 0, 1 = > 0, 2 = >= 0.5), so the
pipeline only crops and normalises: its output equals reading the folders (packs written
before the levels hold {0, 1}: their ">= 0.5" pixel metrics are undefined; pack again). No TensorFlow is needed to write or read.

Written by `python -m dinomaly_jax.data.pack` (pack.py); read through
`make_reader` of pipeline.py when data.packed is set. The record list (paths,
classes, labels, defect types) is stored in DIR/dinomaly_pack.json.

DIR may be a URL (gs://, s3://): array_record reads local files only, so each host
copies the pack once into its cache folder (`local_copy`), keyed by the URL and the
pack's metadata; writing to a URL packs locally, then uploads.
"""
from concurrent import futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tempfile

import numpy as np
from PIL import Image

from dinomaly_jax import storage
from dinomaly_jax.data import transforms
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

METADATA_FILE = "dinomaly_pack.json"
DATASET_NAME = "dinomaly_pack"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
SHARD_SIZE = 1000  # examples per array_record file
SPLITS = ("train", "test")


def _features(resize: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(resize, resize, 3), encoding_format="png"),
      "mask": tfds.features.Image(shape=(resize, resize, 1), encoding_format="png"),
  })


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _encode(args: tuple[Record, int]) -> tuple[bytes, bytes]:
  """One record -> PNG bytes of its resized image and binary mask."""
  record, resize = args
  image, mask = transforms.load_resized(record.image_path, record.mask_path, resize)
  return _png(image), _png(mask)


def write(records: dict[str, list[Record]], out_dir: str, resize: int, workers: int = 0,
          description: str = "") -> None:
  """Writes the records of each split as a TFDS array_record dataset in out_dir (local or URL)."""
  if storage.is_url(out_dir):
    if storage.exists(storage.join(out_dir, METADATA_FILE)):
      raise DataError(f"{out_dir}: already holds a packed dataset; expected a new folder.")
    with tempfile.TemporaryDirectory(prefix="dinomaly_pack_") as tmp:
      write(records, tmp, resize, workers, description)
      storage.copy_tree(tmp, out_dir)
    return
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  if storage.exists(storage.join(out_dir, METADATA_FILE)):
    raise DataError(f"{out_dir}: already holds a packed dataset; expected a new folder.")
  storage.makedirs(out_dir)
  features = _features(resize)
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  pool = (futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
          if workers else None)
  split_infos = []
  try:
    for split, split_records in records.items():
      template = tfds.core.ShardedFileTemplate(
          data_dir=out_dir, template=FILE_TEMPLATE, dataset_name=DATASET_NAME, split=split,
          filetype_suffix="array_record")
      n_shards = max(1, -(-len(split_records) // SHARD_SIZE))
      args = [(r, resize) for r in split_records]
      encoded = pool.map(_encode, args, chunksize=4) if pool else map(_encode, args)
      lengths, num_bytes = [], 0
      for shard in range(n_shards):
        path = os.fspath(template.sharded_filepath(shard_index=shard, num_shards=n_shards))
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        count = min(SHARD_SIZE, len(split_records) - shard * SHARD_SIZE)
        for _ in range(count):
          image, mask = next(encoded)
          writer.write(serializer.serialize_example(
              features.encode_example({"image": image, "mask": mask})))
        writer.close()
        lengths.append(count)
        num_bytes += storage.size(path)
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                             num_bytes=num_bytes, filename_template=template))
  finally:
    if pool:
      pool.shutdown()
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features, split_infos=split_infos,
      filename_template=FILE_TEMPLATE, check_data=False, description=description)
  metadata = {"resize": resize,
              "splits": {s: [vars(r) for r in rs] for s, rs in records.items()}}
  storage.write_text(storage.join(out_dir, METADATA_FILE), json.dumps(metadata))


def _no_opencv_note(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("OpenCV is not installed")


def _hide_opencv_note() -> None:
  """TFDS decodes PNGs with PIL when OpenCV is missing and says so on the first image (of
  each process); PIL is what the packs are read with on purpose, so that note is not shown."""
  logging.getLogger("absl").addFilter(_no_opencv_note)  # a second add of the same filter is a no-op


def _metadata(packed: str, resize: int | None = None) -> dict:
  """The pack's dinomaly_pack.json (local or cloud paths); checks its resize."""
  path = storage.join(packed, METADATA_FILE)
  if not storage.exists(path):
    raise DataError(f"{packed}: not a packed dataset (no {METADATA_FILE}); expected a folder "
                    "written by `python -m dinomaly_jax.data.pack`.")
  meta = json.loads(storage.read_text(path))
  if resize is not None and meta["resize"] != resize:
    raise DataError(f"{packed}: packed at resize {meta['resize']} but config.data.resize is "
                    f"{resize}; expected equal (pack again or change the config).")
  return meta


def list_classes(packed: str) -> list[str]:
  splits = _metadata(packed)["splits"].values()
  return list(dict.fromkeys(r["class_name"] for records in splits for r in records))


def read_records(packed: str, split: str, classes: list[str], data_config) -> list[Record]:
  """The packed records of `split` for `classes`, in class order."""
  meta = _metadata(packed, data_config.resize)
  if split not in meta["splits"]:
    raise DataError(f"{packed}: has no {split!r} split; expected {SPLITS}.")
  records = [Record(**r) for r in meta["splits"][split]]
  return [r for c in classes for r in records if r.class_name == c]


def local_copy(packed: str, meta: dict) -> str:
  """`packed` itself if local, else this host's copy of it (made once, then reused)."""
  if not storage.is_url(packed):
    return packed
  key = hashlib.sha1((packed + json.dumps(meta, sort_keys=True)).encode()).hexdigest()[:16]
  folder = storage.join(storage.local_cache_dir(), "packs", key)
  if not storage.isdir(folder):
    print(f"Copying the packed dataset {packed} to this host ({folder}), once.", flush=True)
  return storage.make_local_once(folder, lambda tmp: storage.copy_tree(packed, tmp))


class PackedReader:
  """Reads records from a packed dataset: (resize, resize) uint8 images and masks."""

  def __init__(self, packed: str, records: list[Record], sizes: transforms.Sizes):
    meta = _metadata(packed, sizes.resize)
    where = {r["image_path"]: (s, i) for s, rs in meta["splits"].items() for i, r in enumerate(rs)}
    missing = [r.image_path for r in records if r.image_path not in where]
    if missing:
      raise DataError(f"{missing[0]}: image not in the packed dataset {packed}; expected "
                      "records built from it.")
    self._packed = local_copy(packed, meta)
    self._where = [where[r.image_path] for r in records]
    self._sources = {}

  def __getstate__(self):  # data sources are reopened in each worker process
    return {**self.__dict__, "_sources": {}}

  def _get(self, i: int) -> dict:
    split, pos = self._where[i]
    if split not in self._sources:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      _hide_opencv_note()
      self._sources[split] = tfds.builder_from_directory(self._packed).as_data_source(split)
    return self._sources[split][pos]

  def image(self, i: int) -> np.ndarray:  # (R, R, 3) uint8
    return self._get(i)["image"]

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # (R, R, 3), (R, R) uint8
    ex = self._get(i)
    return ex["image"], ex["mask"][..., 0]
