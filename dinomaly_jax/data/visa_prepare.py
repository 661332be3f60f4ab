r"""Builds VisA's 1cls layout from the raw VisA release and its split_csv/1cls.csv.

  python -m dinomaly_jax.data.visa_prepare --raw=/data/VisA --out=/data/VisA_pytorch
  -> /data/VisA_pytorch/1cls/<class>/{train/good, test/good, test/bad, ground_truth/bad}

Each CSV row (object, split, label, image, mask) copies the image to
<out>/1cls/<object>/<split>/<good|bad>/ ("normal" -> good); the masks of defective test
images are binarised (non-zero -> 255) into ground_truth/bad/, as the reference's
prepare_visa.py does.
"""
import csv
import io
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from dinomaly_jax import storage
from dinomaly_jax.data import transforms
from dinomaly_jax.data import visa
from dinomaly_jax.errors import DataError

COLUMNS = ("object", "split", "label", "image", "mask")


def _read_rows(csv_path: str) -> list[dict]:
  if not storage.isfile(csv_path):
    raise DataError(f"{csv_path}: split CSV not found; expected VisA's split_csv/1cls.csv.")
  reader = csv.DictReader(io.StringIO(storage.read_text(csv_path), newline=""))
  if tuple(reader.fieldnames or ()) != COLUMNS:
    raise DataError(f"{csv_path}: columns are {reader.fieldnames}; expected {list(COLUMNS)}.")
  rows = list(reader)
  for i, row in enumerate(rows):
    if row["split"] not in ("train", "test"):
      raise DataError(f"{csv_path}: row {i + 2} has split {row['split']!r}; expected train or test.")
  return rows


def prepare(raw: str, out: str, csv_path: str | None = None) -> str:
  """Writes <out>/1cls from the raw release; returns that folder."""
  if not storage.isdir(raw):
    raise DataError(f"{raw}: raw VisA folder not found.")
  csv_path = csv_path or storage.join(raw, "split_csv", "1cls.csv")
  rows = _read_rows(csv_path)
  target = storage.join(out, visa.SPLIT_NAME)
  for i, row in enumerate(rows):
    label = "good" if row["label"] == "normal" else "bad"
    image = storage.join(raw, row["image"])
    if not storage.isfile(image):
      raise DataError(f"{image}: image of {csv_path} row {i + 2} not found.")
    image_dir = storage.join(target, row["object"], row["split"], label)
    storage.write_bytes(storage.join(image_dir, storage.basename(row["image"])), storage.read_bytes(image))
    if row["split"] == "test" and label == "bad":
      mask = storage.join(raw, row["mask"])
      if not row["mask"] or not storage.isfile(mask):
        raise DataError(f"{mask}: mask of {csv_path} row {i + 2} not found.")
      mask_dir = storage.join(target, row["object"], "ground_truth", label)
      with transforms.open_image(mask) as m:
        binary = Image.fromarray((np.asarray(m) != 0).astype(np.uint8) * 255)
      storage.write_bytes(storage.join(mask_dir, storage.basename(row["mask"])),
                          storage.encoded(lambda f: binary.save(f, format="PNG")))
  return target


_RAW = flags.DEFINE_string("raw", None, "The raw VisA release folder.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (1cls/ is created in it).", required=True)
_CSV = flags.DEFINE_string("csv", None, "Split CSV (default <raw>/split_csv/1cls.csv).")


def main(argv) -> None:
  del argv
  try:
    target = prepare(_RAW.value, _OUT.value, _CSV.value)
  except DataError as e:
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"VisA 1cls layout written to {target}; use --config.data.root={target}")


if __name__ == "__main__":
  app.run(main)
