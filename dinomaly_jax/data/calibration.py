"""The calibration split: normal images per class that training never sees.

Two sources (config.data.calibration): `fraction` holds that share of each class's
training images out of training (a fixed choice per class and set of files, independent
of the seed and of the file order), or `folder` names normal images of your own, `<folder>/<class>/*.png`
(for a single-class folder dataset the images may sit in `<folder>` itself).
Both off: no calibration split (the protocol trains on all of train/good). A run trained
with `fraction` may be recalibrated later from a `folder` (--mode=eval): the folder's images
then replace the held-out ones as the calibration split (training still excludes those).
MVTec AD 2 ships a calibration split (validation/good): its layout's split is the default there.
"""
import zlib

import numpy as np

from dinomaly_jax import storage
from dinomaly_jax.data import image_files
from dinomaly_jax.data.records import GOOD
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError


LAYOUT_SPLITS = {"mvtec_ad2": "validation/good"}  # layouts that ship a calibration split


def layout_split(data_config) -> str:
  """The layout's own calibration split when neither source is configured, else ""."""
  c = data_config.calibration
  return "" if c.folder or c.fraction > 0 else LAYOUT_SPLITS.get(data_config.layout, "")


def enabled(data_config) -> bool:
  c = data_config.calibration
  return bool(c.folder) or c.fraction > 0 or bool(layout_split(data_config))


def describe(data_config) -> str:
  """The calibration source in words (for reports)."""
  c = data_config.calibration
  if c.folder and c.fraction > 0:  # a run trained with a held-out split, recalibrated later
    return f"folder {c.folder} (replaces the {c.fraction:g} of train/good held out)"
  if c.folder:
    return f"folder {c.folder}"
  if layout_split(data_config):
    return f"the dataset's {layout_split(data_config)}"
  return f"{c.fraction:g} of train/good held out" if c.fraction > 0 else "off"


def _held_out(n: int, fraction: float, class_name: str) -> np.ndarray:
  """bool (n,): which of a class's n training images are calibration images."""
  k = min(max(int(round(n * fraction)), 1), n - 1)
  rng = np.random.default_rng(zlib.crc32(class_name.encode()))
  held = np.zeros((n,), bool)
  held[rng.permutation(n)[:k]] = True
  return held


def split_train(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
  """(training, calibration) records: `fraction` of each class's images held out.

  At least one image per class goes to each side; fraction 0 keeps all for training.
  """
  if fraction <= 0:
    return list(records), []
  by_class = {}
  for r in records:
    by_class.setdefault(r.class_name, []).append(r)
  train, calibration = [], []
  held_paths = set()
  for name, rs in by_class.items():
    if len(rs) < 2:
      raise DataError(f"class {name!r} has {len(rs)} training image: too few to hold "
                      "config.data.calibration.fraction of them out; expected at least 2.")
    paths = sorted(r.image_path for r in rs)  # the choice does not depend on the list order
    held_paths.update(p for p, held in zip(paths, _held_out(len(paths), fraction, name)) if held)
  for r in records:
    (calibration if r.image_path in held_paths else train).append(r)
  return train, calibration


def folder_records(folder: str, classes: list[str]) -> list[Record]:
  """Normal calibration records from `<folder>/<class>/` (or `<folder>` for one class)."""
  if not storage.isdir(folder):
    raise DataError(f"{folder}: calibration folder (config.data.calibration.folder) not found.")
  records = []
  for name in classes:
    class_dir = storage.join(folder, name)
    if not storage.isdir(class_dir) and len(classes) == 1:
      class_dir = folder
    images = image_files.list_images(class_dir) if storage.isdir(class_dir) else []
    if not images:
      raise DataError(f"{class_dir}: no calibration images of class {name!r}; expected normal "
                      f"images ({', '.join(image_files.IMAGE_EXTENSIONS)}) in <folder>/<class>/.")
    records += [Record(p, name, 0, GOOD, None) for p in images]
  return records
