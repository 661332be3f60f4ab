"""Real-IAD -> records, from its JSON splits.

  <root>/realiad_1024/<class>/...                        images and masks
  <root>/realiad_jsons/realiad_jsons/<class>.json        {"train": [...], "test": [...]}

Each JSON sample has `image_path` and `mask_path` relative to realiad_1024/<class>, and
`anomaly_class` ("OK" = normal).
"""
import json

from dinomaly_jax import storage
from dinomaly_jax.data import mvtec
from dinomaly_jax.data.records import GOOD
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

IMAGES_DIR = "realiad_1024"
NORMAL_CLASS = "OK"


def json_dir(root: str) -> str:
  mvtec.check_root(root)
  for candidate in (storage.join(root, "realiad_jsons", "realiad_jsons"),
                    storage.join(root, "realiad_jsons")):
    if storage.isdir(candidate) and any(f.endswith(".json") for f in storage.listdir(candidate)):
      return candidate
  raise DataError(f"{root}/realiad_jsons/realiad_jsons: folder of the Real-IAD JSON splits "
                  "(<class>.json) not found.")


def list_classes(root: str) -> list[str]:
  return sorted(f[:-len(".json")] for f in storage.listdir(json_dir(root)) if f.endswith(".json"))


def _load_split(path: str, split: str) -> list:
  try:
    samples = json.loads(storage.read_text(path))[split]
  except FileNotFoundError:
    raise DataError(f"{path}: Real-IAD class JSON not found.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e}).") from None
  except (KeyError, TypeError):
    raise DataError(f"{path}: expected a JSON object with a {split!r} list of samples.") from None
  if not isinstance(samples, list):
    raise DataError(f"{path}: {split!r} must be a list of samples.")
  return samples


def class_records(root: str, class_name: str, split: str) -> list[Record]:
  path = storage.join(json_dir(root), class_name + ".json")
  image_dir = storage.join(root, IMAGES_DIR, class_name)
  if not storage.isdir(image_dir):
    raise DataError(f"{image_dir}: class folder not found.")
  records = []
  for i, s in enumerate(_load_split(path, split)):
    try:
      image, kind = s["image_path"], s["anomaly_class"]
    except (KeyError, TypeError):
      raise DataError(f"{path}: {split}[{i}] must have 'image_path' and 'anomaly_class'.") from None
    label = int(kind != NORMAL_CLASS)
    mask = s.get("mask_path") if label else None
    if label and not mask:
      raise DataError(f"{storage.join(image_dir, image)}: defective image without a mask; "
                      f"expected a 'mask_path' in {path} {split}[{i}].")
    records.append(Record(storage.join(image_dir, image), class_name, label,
                          GOOD if not label else kind,
                          storage.join(image_dir, mask) if mask else None))
  if not records:
    raise DataError(f"{path}: the {split!r} list is empty; expected its {split} images.")
  return records
