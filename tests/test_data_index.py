"""Each dataset layout indexed from a small tree: counts, labels, defect types, mask pairing."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from dinomaly_jax.config import defaults
from dinomaly_jax.data import index
from dinomaly_jax.data import visa_prepare


def png(path, size=(12, 16), value=128, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = size + (3,) if mode == "RGB" else size
  Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)
  return str(path)


def data_config(layout, root, classes=()):
  c = defaults.base_config().data
  c.layout, c.root, c.classes = layout, str(root), tuple(classes)
  return c


def mvtec_tree(root, classes=("bottle", "wood"), normal="good", mask_suffix="_mask", ext=".png"):
  for c in classes:
    for i in range(3):
      png(f"{root}/{c}/train/{normal}/{i:03d}{ext}")
    for i in range(2):
      png(f"{root}/{c}/test/{normal}/{i:03d}{ext}")
    for defect, n in (("crack", 2), ("scratch", 1)):
      for i in range(n):
        png(f"{root}/{c}/test/{defect}/{i:03d}{ext}")
        png(f"{root}/{c}/ground_truth/{defect}/{i:03d}{mask_suffix}.png", value=255, mode="L")
  with open(f"{root}/license.txt", "w") as f:  # files beside the classes are ignored
    f.write("x")
  return root


def _summary(records):
  return [(os.path.basename(r.image_path), r.class_name, r.label, r.defect_type,
           r.mask_path and os.path.basename(r.mask_path)) for r in records]


@pytest.mark.parametrize("layout", ["mvtec", "mpdd"])
def test_mvtec_layout(tmp_path, layout):
  c = data_config(layout, mvtec_tree(tmp_path))
  assert index.list_classes(c) == ["bottle", "wood"]
  train = index.build_records(c, "train")
  assert len(train) == 6 and {r.label for r in train} == {0}
  assert all(r.mask_path is None and r.defect_type == "good" for r in train)
  test = index.build_records(c, "test")
  assert _summary(test)[:5] == [
      ("000.png", "bottle", 0, "good", None), ("001.png", "bottle", 0, "good", None),
      ("000.png", "bottle", 1, "crack", "000_mask.png"),
      ("001.png", "bottle", 1, "crack", "001_mask.png"),
      ("000.png", "bottle", 1, "scratch", "000_mask.png")]
  assert len(test) == 10 and sum(r.label for r in test) == 6
  for r in test:
    if r.label:
      assert os.path.dirname(r.mask_path).endswith(f"ground_truth/{r.defect_type}")


def test_class_selection(tmp_path):
  c = data_config("mvtec", mvtec_tree(tmp_path), classes=["wood"])
  assert index.list_classes(c) == ["wood"]
  assert {r.class_name for r in index.build_records(c, "test")} == {"wood"}


def test_btad_ok_folders_and_plain_mask_names(tmp_path):
  c = data_config("btad", mvtec_tree(tmp_path, classes=("01",), normal="ok", mask_suffix="",
                                     ext=".bmp"))
  test = index.build_records(c, "test")
  assert [r.label for r in test] == [0, 0, 1, 1, 1]
  assert test[2].mask_path.endswith("ground_truth/crack/000.png")
  assert len(index.build_records(c, "train")) == 3


def visa_tree(root):
  for c in ("candle", "pcb1"):
    for i in range(2):
      png(f"{root}/1cls/{c}/train/good/{i:03d}.JPG")
      png(f"{root}/1cls/{c}/test/good/{i:03d}.JPG")
      png(f"{root}/1cls/{c}/test/bad/{i + 10:03d}.JPG")
      png(f"{root}/1cls/{c}/ground_truth/bad/{i + 10:03d}.png", value=255, mode="L")
  return root


@pytest.mark.parametrize("inner", [False, True])
def test_visa_1cls_layout(tmp_path, inner):
  root = visa_tree(tmp_path)
  c = data_config("visa", f"{root}/1cls" if inner else root)
  assert index.list_classes(c) == ["candle", "pcb1"]
  test = index.build_records(c, "test")
  assert [(r.class_name, r.label, r.defect_type) for r in test[:4]] == [
      ("candle", 0, "good"), ("candle", 0, "good"), ("candle", 1, "bad"), ("candle", 1, "bad")]
  assert test[2].mask_path.endswith("candle/ground_truth/bad/010.png")
  assert len(index.build_records(c, "train")) == 4


def test_visa_prepare_builds_1cls_from_raw_release(tmp_path):
  raw = tmp_path / "VisA"
  rows = [["object", "split", "label", "image", "mask"]]
  for c in ("candle", "fryum"):
    for i in range(3):
      png(f"{raw}/{c}/Data/Images/Normal/{i:04d}.JPG")
      rows.append([c, "train" if i < 2 else "test", "normal", f"{c}/Data/Images/Normal/{i:04d}.JPG", ""])
    png(f"{raw}/{c}/Data/Images/Anomaly/000.JPG")
    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:9] = 7  # VisA masks hold class ids; the layout binarises them to 255
    os.makedirs(f"{raw}/{c}/Data/Masks/Anomaly")
    Image.fromarray(mask).save(f"{raw}/{c}/Data/Masks/Anomaly/000.png")
    rows.append([c, "test", "anomaly", f"{c}/Data/Images/Anomaly/000.JPG",
                 f"{c}/Data/Masks/Anomaly/000.png"])
  os.makedirs(raw / "split_csv")
  with open(raw / "split_csv" / "1cls.csv", "w") as f:
    f.write("\n".join(",".join(r) for r in rows) + "\n")
  target = visa_prepare.prepare(str(raw), str(tmp_path / "out"))
  assert target == str(tmp_path / "out" / "1cls")
  c = data_config("visa", tmp_path / "out")
  assert len(index.build_records(c, "train")) == 4
  test = index.build_records(c, "test")
  assert [(r.class_name, r.label) for r in test] == [("candle", 0), ("candle", 1), ("fryum", 0), ("fryum", 1)]
  out_mask = np.asarray(Image.open(test[1].mask_path))
  assert set(np.unique(out_mask)) == {0, 255} and (out_mask == 255).sum() == 18


def realiad_tree(root):
  for c in ("audiojack", "button_battery"):
    samples = {"train": [], "test": []}
    for i in range(2):
      png(f"{root}/realiad_1024/{c}/S{i:04d}/OK_{i}.jpg")
      samples["train"].append({"image_path": f"S{i:04d}/OK_{i}.jpg", "anomaly_class": "OK",
                               "mask_path": None})
    png(f"{root}/realiad_1024/{c}/S0100/OK_0.jpg")
    png(f"{root}/realiad_1024/{c}/S0101/NG_0.jpg")
    png(f"{root}/realiad_1024/{c}/S0101/NG_0.png", value=255, mode="L")
    samples["test"] = [
        {"image_path": "S0100/OK_0.jpg", "anomaly_class": "OK", "mask_path": None},
        {"image_path": "S0101/NG_0.jpg", "anomaly_class": "AK", "mask_path": "S0101/NG_0.png"}]
    os.makedirs(f"{root}/realiad_jsons/realiad_jsons", exist_ok=True)
    with open(f"{root}/realiad_jsons/realiad_jsons/{c}.json", "w") as f:
      json.dump({"meta": {}, **samples}, f)
  return root


def test_realiad_layout(tmp_path):
  c = data_config("realiad", realiad_tree(tmp_path))
  assert index.list_classes(c) == ["audiojack", "button_battery"]
  assert len(index.build_records(c, "train")) == 4
  test = index.build_records(c, "test")
  assert [(r.class_name, r.label, r.defect_type) for r in test] == [
      ("audiojack", 0, "good"), ("audiojack", 1, "AK"),
      ("button_battery", 0, "good"), ("button_battery", 1, "AK")]
  assert test[1].mask_path == f"{tmp_path}/realiad_1024/audiojack/S0101/NG_0.png"
  assert test[0].mask_path is None


def test_folder_layout_single_class_without_masks(tmp_path):
  root = tmp_path / "parts"
  for i in range(3):
    png(f"{root}/train/good/{i}.png")
  png(f"{root}/test/good/a.png")
  png(f"{root}/test/dent/b.png")
  c = data_config("folder", root)
  assert index.list_classes(c) == ["parts"]
  test = index.build_records(c, "test")
  assert [(r.class_name, r.label, r.defect_type, r.mask_path) for r in test] == [
      ("parts", 0, "good", None), ("parts", 1, "dent", None)]
  assert len(index.build_records(c, "train")) == 3


def test_folder_layout_with_masks(tmp_path):
  c = data_config("folder", mvtec_tree(tmp_path))
  assert sum(r.mask_path is not None for r in index.build_records(c, "test")) == 6
