"""Every bad input gives one DataError naming the file or folder and what was expected."""
import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from dinomaly_jax.data import index
from dinomaly_jax.data import packed
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import visa_prepare
from dinomaly_jax.errors import DataError
from tests.test_data_index import data_config
from tests.test_data_index import mvtec_tree
from tests.test_data_index import png
from tests.test_data_index import realiad_tree


def _raises(message, fn, *args):
  with pytest.raises(DataError, match=re.escape(message)):
    fn(*args)


def test_empty_root(tmp_path):
  _raises("config.data.root is empty; expected the dataset folder.",
          index.build_records, data_config("mvtec", ""), "train")


def test_missing_root(tmp_path):
  _raises(f"{tmp_path}/nope: dataset root folder not found.",
          index.build_records, data_config("mvtec", tmp_path / "nope"), "train")


def test_root_without_classes(tmp_path):
  os.makedirs(tmp_path / "stuff")
  _raises(f"{tmp_path}: no class folders found; expected <root>/<class>/train/good",
          index.list_classes, data_config("mvtec", tmp_path))


def test_missing_class_folder(tmp_path):
  c = data_config("mvtec", mvtec_tree(tmp_path), classes=["bottle", "cable"])
  _raises(f"{tmp_path}: class folder(s) ['cable'] not found; the classes there are "
          "['bottle', 'wood'].", index.build_records, c, "train")


def test_missing_training_folder(tmp_path):
  shutil.rmtree(mvtec_tree(tmp_path) / "wood" / "train" / "good")
  os.makedirs(tmp_path / "wood" / "train" / "other")
  _raises(f"{tmp_path}/wood/train/good: training folder not found; expected the normal training "
          "images there.", index.build_records, data_config("mvtec", tmp_path), "train")


def test_empty_training_folder(tmp_path):
  for f in (mvtec_tree(tmp_path) / "wood" / "train" / "good").iterdir():
    f.unlink()
  _raises(f"{tmp_path}/wood/train/good: training folder has no images; expected files ending in "
          ".png", index.build_records, data_config("mvtec", tmp_path), "train")


def test_unreadable_image(tmp_path):
  with open(mvtec_tree(tmp_path) / "wood" / "train" / "good" / "001.png", "w") as f:
    f.write("not an image")
  _raises(f"{tmp_path}/wood/train/good/001.png: cannot be read as an image",
          index.build_records, data_config("mvtec", tmp_path), "train")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_truncated_image(tmp_path, ext):
  root = mvtec_tree(tmp_path)
  path = root / "wood" / "test" / "good" / f"009{ext}"
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _raises(f"{path}: image is truncated or corrupt (", index.build_records,
          data_config("mvtec", root), "test")


def test_mask_size_differs_from_image(tmp_path):
  root = mvtec_tree(tmp_path)
  mask = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
  png(mask, size=(12, 15), value=255, mode="L")
  _raises(f"{mask}: mask is 15x12 but its image {root}/bottle/test/crack/001.png is 16x12; "
          "expected the same size.", index.build_records, data_config("mvtec", root), "test")


def test_mask_without_image(tmp_path):
  root = mvtec_tree(tmp_path)
  orphan = png(root / "bottle" / "ground_truth" / "crack" / "007_mask.png", mode="L")
  _raises(f"{orphan}: mask without an image; expected an image named 007.* in "
          f"{root}/bottle/test/crack.", index.build_records, data_config("mvtec", root), "test")


def test_mask_folder_without_test_folder(tmp_path):
  root = mvtec_tree(tmp_path)
  orphan = png(root / "bottle" / "ground_truth" / "hole" / "000_mask.png", mode="L")
  _raises(f"{orphan}: mask without an image; expected a test folder {root}/bottle/test/hole.",
          index.build_records, data_config("mvtec", root), "test")


def test_defect_image_without_mask(tmp_path):
  root = mvtec_tree(tmp_path)
  image = png(root / "wood" / "test" / "crack" / "005.png")
  _raises(f"{image}: defective image without a mask; expected {root}/wood/ground_truth/crack/"
          "005_mask.png (or 005.png).", index.build_records, data_config("mvtec", root), "test")


def test_defect_type_without_ground_truth_folder(tmp_path):
  root = mvtec_tree(tmp_path)
  png(root / "wood" / "test" / "hole" / "000.png")
  _raises(f"{root}/wood/ground_truth/hole: ground-truth folder not found; expected a mask "
          f"<stem>_mask.png for each image of {root}/wood/test/hole.",
          index.build_records, data_config("mvtec", root), "test")


def test_realiad_missing_json_folder(tmp_path):
  os.makedirs(tmp_path / "realiad_1024")
  _raises(f"{tmp_path}/realiad_jsons/realiad_jsons: folder of the Real-IAD JSON splits",
          index.list_classes, data_config("realiad", tmp_path))


def test_realiad_defect_without_mask_path(tmp_path):
  root = realiad_tree(tmp_path)
  path = f"{root}/realiad_jsons/realiad_jsons/audiojack.json"
  with open(path) as f:
    data = json.load(f)
  data["test"][1]["mask_path"] = None
  with open(path, "w") as f:
    json.dump(data, f)
  _raises(f"{root}/realiad_1024/audiojack/S0101/NG_0.jpg: defective image without a mask; "
          f"expected a 'mask_path' in {path} test[1].",
          index.build_records, data_config("realiad", root), "test")


def test_realiad_invalid_json_and_missing_image(tmp_path):
  root = realiad_tree(tmp_path)
  os.remove(f"{root}/realiad_1024/button_battery/S0001/OK_1.jpg")
  _raises(f"{root}/realiad_1024/button_battery/S0001/OK_1.jpg: image file not found.",
          index.build_records, data_config("realiad", root), "train")
  with open(f"{root}/realiad_jsons/realiad_jsons/audiojack.json", "w") as f:
    f.write("{")
  _raises(f"{root}/realiad_jsons/realiad_jsons/audiojack.json: not valid JSON",
          index.build_records, data_config("realiad", root), "train")


def test_visa_prepare_bad_inputs(tmp_path):
  _raises(f"{tmp_path}/raw: raw VisA folder not found.",
          visa_prepare.prepare, str(tmp_path / "raw"), str(tmp_path / "out"))
  os.makedirs(tmp_path / "raw" / "split_csv")
  _raises(f"{tmp_path}/raw/split_csv/1cls.csv: split CSV not found",
          visa_prepare.prepare, str(tmp_path / "raw"), str(tmp_path / "out"))
  csv = tmp_path / "raw" / "split_csv" / "1cls.csv"
  csv.write_text("object,image\ncandle,a.JPG\n")
  _raises(f"{csv}: columns are ['object', 'image']; expected ['object', 'split', 'label', "
          "'image', 'mask'].", visa_prepare.prepare, str(tmp_path / "raw"), str(tmp_path / "out"))
  csv.write_text("object,split,label,image,mask\ncandle,train,normal,candle/a.JPG,\n")
  _raises(f"{tmp_path}/raw/candle/a.JPG: image of {csv} row 2 not found.",
          visa_prepare.prepare, str(tmp_path / "raw"), str(tmp_path / "out"))


def test_not_a_packed_dataset(tmp_path):
  c = data_config("mvtec", "")
  c.packed = str(tmp_path)
  _raises(f"{tmp_path}: not a packed dataset (no {packed.METADATA_FILE}); expected a folder "
          "written by `python -m dinomaly_jax.data.pack`.", index.build_records, c, "train")


def test_fewer_training_images_than_batch(tmp_path):
  c = data_config("mvtec", mvtec_tree(tmp_path))
  records = index.build_records(c, "train")
  _raises("6 training images are fewer than one global batch of 8 (2 processes x 4); use a "
          "smaller config.train.batch_size", lambda: pipeline.train_iterator(
              records, c, batch_size=4, seed=0, process_index=1, process_count=2))


def test_corrupt_image_found_while_reading(tmp_path):
  """A PNG whose data is damaged but whose end is intact passes the quick index check."""
  root = mvtec_tree(tmp_path)
  path = root / "wood" / "train" / "good" / "000.png"
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)
  data = bytearray(path.read_bytes())
  data[100:400] = bytes(300)
  path.write_bytes(bytes(data))
  c = data_config("mvtec", root, classes=["wood"])
  c.resize, c.crop = 16, 14
  records = index.build_records(c, "train")
  batches = pipeline.train_iterator(records, c, batch_size=3, seed=0, workers=0)
  _raises(f"{path}: image is truncated or corrupt", next, batches)
