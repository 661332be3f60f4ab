"""MVTec-AD layout (also MPDD, BTAD, VisA 1cls and generic folders) -> records.

  <root>/<class>/train/good/*.png
  <root>/<class>/test/good/*.png, <root>/<class>/test/<defect>/*.png
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png, as VisA and BTAD)

Images and masks are paired by file name (the reference pairs them by sorted order).
A class without a test/ folder is normal-only: no test records (train and calibrate only).
"good" and BTAD's "ok" name the normal folders.
"""
import os

from dinomaly_jax import storage
from dinomaly_jax.data.image_files import IMAGE_EXTENSIONS
from dinomaly_jax.data.image_files import is_image
from dinomaly_jax.data.image_files import list_images
from dinomaly_jax.data.records import GOOD
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

NORMAL_DIRS = (GOOD, "ok")
SPLITS = ("train", "test")


def check_root(root: str) -> None:
  if not root:
    raise DataError("config.data.root is empty; expected the dataset folder.")
  if not storage.isdir(root):
    raise DataError(f"{root}: dataset root folder not found.")


def subdirs(folder: str) -> list[str]:
  return [d for d in storage.listdir(folder)
          if not d.startswith(".") and storage.isdir(storage.join(folder, d))]


def _files_under(folder: str) -> list[str]:
  """Every file below `folder`, hidden files and folders (".DS_Store", ".git") left out."""
  return storage.walk_files(folder, skip_hidden=True)


def non_images(folder: str) -> list[str]:
  """Files below `folder` that the index skips (notes.txt, Thumbs.db; hidden files are
  skipped silently and not listed)."""
  return [f for f in _files_under(folder) if not is_image(f)]


def ignored_paths(root: str, classes: list[str]) -> list[str]:
  """What the index skips, for one warning: folders of `root` without any image (not
  classes) and the non-image files of the class folders."""
  empty = [storage.join(root, d) + "/" for d in subdirs(root)
           if d not in classes and not any(map(is_image, _files_under(storage.join(root, d))))]
  return empty + [f for c in classes for f in non_images(storage.join(root, c))]


def list_classes(root: str) -> list[str]:
  """Class folders of root: those holding a train/ or test/ folder and at least one image."""
  check_root(root)
  classes = [d for d in subdirs(root)
             if any(storage.isdir(storage.join(root, d, s)) for s in SPLITS)
             and any(map(is_image, _files_under(storage.join(root, d))))]
  if not classes:
    raise DataError(f"{root}: no class folders found; expected <root>/<class>/train/good "
                    "and <root>/<class>/test/<type> (MVTec-AD layout).")
  return classes


def _normal_dir(split_dir: str) -> str | None:
  for name in NORMAL_DIRS:
    if storage.isdir(storage.join(split_dir, name)):
      return name
  return None


def _mask_key(mask_file: str) -> str:
  stem = os.path.splitext(mask_file)[0]
  return stem[:-len("_mask")] if stem.endswith("_mask") else stem


def _paired_masks(images: list[str], gt_dir: str, masks_required: bool) -> list[str | None]:
  """Mask path of each image of one defect folder, matched by file stem."""
  if not storage.isdir(gt_dir):
    if masks_required:
      raise DataError(f"{gt_dir}: ground-truth folder not found; expected a mask "
                      f"<stem>_mask.png for each image of {storage.dirname(images[0])}.")
    return [None] * len(images)
  masks = {_mask_key(storage.basename(m)): m for m in list_images(gt_dir)}
  stems = [os.path.splitext(storage.basename(p))[0] for p in images]
  for path, stem in zip(images, stems):
    if stem not in masks:
      raise DataError(f"{path}: defective image without a mask; expected {gt_dir}/"
                      f"{stem}_mask.png (or {stem}.png).")
  for key, mask in sorted(masks.items()):
    if key not in stems:
      raise DataError(f"{mask}: mask without an image; expected an image named {key}.* in "
                      f"{storage.dirname(images[0])}.")
  return [masks[s] for s in stems]


def _check_orphan_masks(class_dir: str, defects: list[str]) -> None:
  gt_root = storage.join(class_dir, "ground_truth")
  if not storage.isdir(gt_root):
    return
  for d in subdirs(gt_root):
    masks = list_images(storage.join(gt_root, d))
    if d not in defects and masks:
      raise DataError(f"{masks[0]}: mask without an image; expected a test folder "
                      f"{storage.join(class_dir, 'test', d)}.")


def class_records(root: str, class_name: str, split: str, *,
                  masks_required: bool = True) -> list[Record]:
  """Records of one class and split ("train" or "test")."""
  class_dir = storage.join(root, class_name)
  if not storage.isdir(class_dir):
    raise DataError(f"{class_dir}: class folder not found.")
  split_dir = storage.join(class_dir, split)
  normal = _normal_dir(split_dir) if storage.isdir(split_dir) else None
  if split == "train":
    if normal is None:
      raise DataError(f"{split_dir}/good: training folder not found; expected the normal "
                      "training images there.")
    images = list_images(storage.join(split_dir, normal))
    if not images:
      raise DataError(f"{storage.join(split_dir, normal)}: training folder has no images; "
                      f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}.")
    return [Record(p, class_name, 0, GOOD, None) for p in images]
  if not storage.isdir(split_dir):
    return []  # a normal-only class (no test folder): calibration, no evaluation
  records = []
  defects = [d for d in subdirs(split_dir) if d not in NORMAL_DIRS]
  if normal is not None:
    records += [Record(p, class_name, 0, GOOD, None)
                for p in list_images(storage.join(split_dir, normal))]
  for defect in defects:
    images = list_images(storage.join(split_dir, defect))
    if not images:
      continue
    masks = _paired_masks(images, storage.join(class_dir, "ground_truth", defect),
                          masks_required)
    records += [Record(p, class_name, 1, defect, m) for p, m in zip(images, masks)]
  _check_orphan_masks(class_dir, defects)
  if not records:
    raise DataError(f"{split_dir}: test folders have no images; expected test/good and "
                    "test/<defect type> folders of images.")
  return records
