"""MVTec AD 2 layout -> records (8 classes: can, fabric, fruit_jelly, rice, sheet_metal, vial,
wallplugs, walnuts; licence CC BY-NC-SA 4.0).

  <root>/<class>/train/good/*.png                      normal images to train on
  <root>/<class>/validation/good/*.png                 normal images: the calibration split
  <root>/<class>/test_public/good/*.png                normal test images
  <root>/<class>/test_public/bad/*.png                 defective test images
  <root>/<class>/test_public/ground_truth/bad/<stem>_mask.png   one mask per defective image
  <root>/<class>/test_private/*.png, test_private_mixed/*.png   unlabelled: predicted into the
                                                       evaluation server's files (--mode=submit)

The test split is test_public (the only labelled one). Every folder of a class must be one
of these splits, so a misspelt folder stops the run instead of being skipped.
"""
import os

from dinomaly_jax import storage
from dinomaly_jax.data import image_files
from dinomaly_jax.data import mvtec
from dinomaly_jax.data.records import GOOD
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

CLASSES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
TEST_SPLIT = "test_public"
UNLABELLED_SPLITS = ("test_private", "test_private_mixed")
SPLIT_FOLDERS = ("train", "validation", TEST_SPLIT) + UNLABELLED_SPLITS
BAD = "bad"


def _class_dir(root: str, class_name: str) -> str:
  class_dir = storage.join(root, class_name)
  if not storage.isdir(class_dir):
    raise DataError(f"{class_dir}: class folder not found.")
  unknown = [d for d in mvtec.subdirs(class_dir) if d not in SPLIT_FOLDERS]
  if unknown:
    raise DataError(f"{storage.join(class_dir, unknown[0])}: unknown split folder; an MVTec AD 2 "
                    f"class holds only {', '.join(SPLIT_FOLDERS)}.")
  return class_dir


def _images(folder: str, what: str) -> list[str]:
  images = image_files.list_images(folder) if storage.isdir(folder) else []
  if not images:
    raise DataError(f"{folder}: no {what} images; expected files ending in "
                    f"{', '.join(image_files.IMAGE_EXTENSIONS)} (MVTec AD 2 layout).")
  return images


def list_classes(root: str) -> list[str]:
  """Class folders of root: those holding train/ or test_public/."""
  mvtec.check_root(root)
  classes = [d for d in mvtec.subdirs(root)
             if any(storage.isdir(storage.join(root, d, s)) for s in ("train", TEST_SPLIT))]
  if not classes:
    raise DataError(f"{root}: no class folders found; expected <root>/<class>/train/good and "
                    f"<root>/<class>/{TEST_SPLIT}/{{good,bad}} (MVTec AD 2 layout, classes such "
                    f"as {', '.join(CLASSES[:3])}).")
  return classes


def _defective(test_dir: str, class_name: str) -> list[Record]:
  images = image_files.list_images(storage.join(test_dir, BAD)) if storage.isdir(storage.join(test_dir, BAD)) else []
  gt_dir = storage.join(test_dir, "ground_truth", BAD)
  records = []
  for path in images:
    stem = os.path.splitext(storage.basename(path))[0]
    mask = storage.join(gt_dir, f"{stem}_mask.png")
    if not storage.isfile(mask):
      raise DataError(f"{path}: defective image without a mask; expected {mask}.")
    records.append(Record(path, class_name, 1, BAD, mask))
  return records


def class_records(root: str, class_name: str, split: str) -> list[Record]:
  """Records of one class: "train" (train/good) or "test" (test_public, labelled)."""
  class_dir = _class_dir(root, class_name)
  if split == "train":
    return [Record(p, class_name, 0, GOOD, None)
            for p in _images(storage.join(class_dir, "train", GOOD), "training")]
  test_dir = storage.join(class_dir, TEST_SPLIT)
  if not storage.isdir(test_dir):
    raise DataError(f"{test_dir}: test folder not found; expected {TEST_SPLIT}/good and "
                    f"{TEST_SPLIT}/bad.")
  good = storage.join(test_dir, GOOD)
  records = [Record(p, class_name, 0, GOOD, None)
             for p in (image_files.list_images(good) if storage.isdir(good) else [])]
  records += _defective(test_dir, class_name)
  if not records:
    raise DataError(f"{test_dir}: no test images; expected {TEST_SPLIT}/good and {TEST_SPLIT}/bad.")
  return records


def calibration_records(root: str, class_name: str) -> list[Record]:
  """The calibration split this dataset ships: validation/good."""
  folder = storage.join(_class_dir(root, class_name), "validation", GOOD)
  return [Record(p, class_name, 0, GOOD, None) for p in _images(folder, "validation")]


def unlabelled_images(root: str, class_name: str, split: str) -> list[str]:
  """The images of an unlabelled test split (test_private, test_private_mixed)."""
  if split not in UNLABELLED_SPLITS:
    raise DataError(f"config.predict.submission_splits: unknown split {split!r}; expected some of "
                    f"{list(UNLABELLED_SPLITS)}.")
  return _images(storage.join(_class_dir(root, class_name), split), split)
