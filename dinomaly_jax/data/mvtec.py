"""MVTec-AD layout (also MPDD, BTAD, VisA 1cls and generic folders) -> records.

  <root>/<class>/train/good/*.png
  <root>/<class>/test/good/*.png, <root>/<class>/test/<defect>/*.png
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png, as VisA and BTAD)

Images and masks are paired by file name (the reference pairs them by sorted order).
"good" and BTAD's "ok" name the normal folders.
"""
import os

from dinomaly_jax.data.records import GOOD
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_DIRS = (GOOD, "ok")
SPLITS = ("train", "test")


def check_root(root: str) -> None:
  if not root:
    raise DataError("config.data.root is empty; expected the dataset folder.")
  if not os.path.isdir(root):
    raise DataError(f"{root}: dataset root folder not found.")


def subdirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def list_images(folder: str) -> list[str]:
  """Sorted image files of a folder (by extension, case-insensitive)."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))


def _files_under(folder: str) -> list[str]:
  """Every file below `folder`, hidden files and folders (".DS_Store", ".git") left out."""
  found = []
  for parent, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(parent, f) for f in sorted(files) if not f.startswith(".")]
  return found


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def non_images(folder: str) -> list[str]:
  """Files below `folder` that the index skips (notes.txt, Thumbs.db; hidden files are
  skipped silently and not listed)."""
  return [f for f in _files_under(folder) if not _is_image(f)]


def ignored_paths(root: str, classes: list[str]) -> list[str]:
  """What the index skips, for one warning: folders of `root` without any image (not
  classes) and the non-image files of the class folders."""
  empty = [os.path.join(root, d) + os.sep for d in subdirs(root)
           if d not in classes and not any(map(_is_image, _files_under(os.path.join(root, d))))]
  return empty + [f for c in classes for f in non_images(os.path.join(root, c))]


def list_classes(root: str) -> list[str]:
  """Class folders of root: those holding a train/ or test/ folder and at least one image."""
  check_root(root)
  classes = [d for d in subdirs(root)
             if any(os.path.isdir(os.path.join(root, d, s)) for s in SPLITS)
             and any(map(_is_image, _files_under(os.path.join(root, d))))]
  if not classes:
    raise DataError(f"{root}: no class folders found; expected <root>/<class>/train/good "
                    "and <root>/<class>/test/<type> (MVTec-AD layout).")
  return classes


def _normal_dir(split_dir: str) -> str | None:
  for name in NORMAL_DIRS:
    if os.path.isdir(os.path.join(split_dir, name)):
      return name
  return None


def _mask_key(mask_file: str) -> str:
  stem = os.path.splitext(mask_file)[0]
  return stem[:-len("_mask")] if stem.endswith("_mask") else stem


def _paired_masks(images: list[str], gt_dir: str, masks_required: bool) -> list[str | None]:
  """Mask path of each image of one defect folder, matched by file stem."""
  if not os.path.isdir(gt_dir):
    if masks_required:
      raise DataError(f"{gt_dir}: ground-truth folder not found; expected a mask "
                      f"<stem>_mask.png for each image of {os.path.dirname(images[0])}.")
    return [None] * len(images)
  masks = {_mask_key(os.path.basename(m)): m for m in list_images(gt_dir)}
  stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
  for path, stem in zip(images, stems):
    if stem not in masks:
      raise DataError(f"{path}: defective image without a mask; expected {gt_dir}/"
                      f"{stem}_mask.png (or {stem}.png).")
  for key, mask in sorted(masks.items()):
    if key not in stems:
      raise DataError(f"{mask}: mask without an image; expected an image named {key}.* in "
                      f"{os.path.dirname(images[0])}.")
  return [masks[s] for s in stems]


def _check_orphan_masks(class_dir: str, defects: list[str]) -> None:
  gt_root = os.path.join(class_dir, "ground_truth")
  if not os.path.isdir(gt_root):
    return
  for d in subdirs(gt_root):
    masks = list_images(os.path.join(gt_root, d))
    if d not in defects and masks:
      raise DataError(f"{masks[0]}: mask without an image; expected a test folder "
                      f"{os.path.join(class_dir, 'test', d)}.")


def class_records(root: str, class_name: str, split: str, *,
                  masks_required: bool = True) -> list[Record]:
  """Records of one class and split ("train" or "test")."""
  class_dir = os.path.join(root, class_name)
  if not os.path.isdir(class_dir):
    raise DataError(f"{class_dir}: class folder not found.")
  split_dir = os.path.join(class_dir, split)
  normal = _normal_dir(split_dir) if os.path.isdir(split_dir) else None
  if split == "train":
    if normal is None:
      raise DataError(f"{split_dir}/good: training folder not found; expected the normal "
                      "training images there.")
    images = list_images(os.path.join(split_dir, normal))
    if not images:
      raise DataError(f"{os.path.join(split_dir, normal)}: training folder has no images; "
                      f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}.")
    return [Record(p, class_name, 0, GOOD, None) for p in images]
  if not os.path.isdir(split_dir):
    raise DataError(f"{split_dir}: test folder not found; expected test/good and "
                    "test/<defect type> folders.")
  records = []
  defects = [d for d in subdirs(split_dir) if d not in NORMAL_DIRS]
  if normal is not None:
    records += [Record(p, class_name, 0, GOOD, None)
                for p in list_images(os.path.join(split_dir, normal))]
  for defect in defects:
    images = list_images(os.path.join(split_dir, defect))
    if not images:
      continue
    masks = _paired_masks(images, os.path.join(class_dir, "ground_truth", defect),
                          masks_required)
    records += [Record(p, class_name, 1, defect, m) for p, m in zip(images, masks)]
  _check_orphan_masks(class_dir, defects)
  if not records:
    raise DataError(f"{split_dir}: test folders have no images; expected test/good and "
                    "test/<defect type> folders of images.")
  return records
