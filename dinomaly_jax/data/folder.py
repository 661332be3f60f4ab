"""Your own images -> records: the MVTec-AD layout with optional masks.

  <root>/<class>/train/good/*          normal images to train on
  <root>/<class>/test/good/*           normal test images
  <root>/<class>/test/<defect>/*       defective test images
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   optional; if the folder of a
                                       defect exists, every image of it needs its mask

`root` may also be a single class folder itself (holding train/ and test/). Without test/
folders the run is normal-only (train and calibrate, no evaluation).
Defective images without masks have mask_path None: their ground truth is all zero, so
pixel metrics of such a class say nothing.
"""
from dinomaly_jax import storage
from dinomaly_jax.data import mvtec
from dinomaly_jax.data.records import Record


def _is_class_folder(root: str) -> bool:
  return storage.isdir(storage.join(root, "train")) or storage.isdir(storage.join(root, "test"))


def list_classes(root: str) -> list[str]:
  mvtec.check_root(root)
  if _is_class_folder(root):
    return [storage.basename(storage.normpath(root))]
  return mvtec.list_classes(root)


def ignored_paths(root: str, classes: list[str]) -> list[str]:
  if _is_class_folder(root):
    return mvtec.non_images(root)
  return mvtec.ignored_paths(root, classes)


def class_records(root: str, class_name: str, split: str) -> list[Record]:
  mvtec.check_root(root)
  if _is_class_folder(root):
    root = storage.dirname(storage.normpath(root))
  return mvtec.class_records(root, class_name, split, masks_required=False)
