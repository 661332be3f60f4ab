"""VisA in its 1cls layout -> records (build it with `python -m dinomaly_jax.data.visa_prepare`).

  <root>/1cls/<class>/train/good, test/good, test/bad, ground_truth/bad/<stem>.png

`root` may be the folder holding 1cls/ or 1cls/ itself.
"""
from dinomaly_jax import storage
from dinomaly_jax.data import mvtec
from dinomaly_jax.data.records import Record

SPLIT_NAME = "1cls"


def resolve_root(root: str) -> str:
  mvtec.check_root(root)
  inner = storage.join(root, SPLIT_NAME)
  return inner if storage.isdir(inner) else root


def list_classes(root: str) -> list[str]:
  return mvtec.list_classes(resolve_root(root))


def class_records(root: str, class_name: str, split: str) -> list[Record]:
  return mvtec.class_records(resolve_root(root), class_name, split)
