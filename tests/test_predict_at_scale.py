"""Prediction through the command line as a line runs it: rows appended as batches finish,
resume, unreadable files as rows, unique output names, heatmaps optional, which calibration
judged each image (flag, CSV, path, pooled), and recalibrating a trained run from a folder."""
import csv
import json
import os
import shutil

from PIL import Image
import pytest

from dinomaly_jax.evaluation import calibration
from dinomaly_jax.inference import prediction_csv
from tests import main_helpers
from tests.test_command_line import _main
from tests.test_command_line import _one_error_line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run trained through the command line (20% of train/good held out)."""
  root = main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run"))
  proc = _main(f"--config=tests/tiny_config.py:{root}", f"--workdir={workdir}", "--config.data.workers=0",
               "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.eval_every=0",
               "--config.eval.pictures_per_class=0")
  assert proc.returncode == 0, proc.stdout
  return root, workdir


def _rows(folder):
  return list(csv.DictReader(open(os.path.join(folder, prediction_csv.CSV_FILE))))


def test_rows_are_appended_resumed_and_never_lost(trained, tmp_path):
  root, workdir = trained
  inputs = tmp_path / "in"
  shutil.copytree(os.path.join(root, "nut", "test", "good"), inputs / "nut")
  Image.open(inputs / "nut" / "000.png").convert("RGB").save(inputs / "nut" / "000.jpg")  # same stem
  shutil.copy(inputs / "nut" / "001.png", inputs / "nut" / "price $5 $x^2$.png")  # mathtext in a name
  (inputs / "nut" / "broken.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  proc = _main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={inputs}",
               f"--config.predict.output={out}", "--config.eval.batch_size=2")
  assert proc.returncode == 0, proc.stdout
  rows = _rows(out)
  assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
  broken = [r for r in rows if r["image"].endswith("broken.png")]
  assert broken[0]["error"].startswith(f"{inputs / 'nut' / 'broken.png'}: cannot be read as an image")
  assert broken[0]["score"] == "" and broken[0]["decision"] == ""
  good = [r for r in rows if not r["error"]]
  assert len({r["heatmap"] for r in good}) == 5 and all(os.path.getsize(r["heatmap"]) for r in good)
  assert {os.path.basename(r["heatmap"]) for r in good} >= {"000_png_heatmap.png", "000_jpg_heatmap.png",
                                                            "price $5 $x^2$_heatmap.png"}
  assert "1 unreadable" in proc.stdout and "Traceback" not in proc.stdout

  # A rerun skips every image; a new image and a torn line (a kill mid-write) are handled.
  shutil.copy(inputs / "nut" / "002.png", inputs / "nut" / "new.png")
  with open(out / prediction_csv.CSV_FILE, "a") as f:
    f.write(f"{inputs / 'nut' / 'new.png'},nut,pa")  # torn: no newline
  proc = _main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={inputs}",
               f"--config.predict.output={out}", "--config.predict.heatmaps=False")
  assert proc.returncode == 0, proc.stdout
  assert "Resuming: 6 of 7 images already have a row" in proc.stdout
  again = _rows(out)
  assert [r["image"] for r in again[:6]] == [r["image"] for r in rows] and len(again) == 7
  assert again[6]["image"].endswith("new.png") and again[6]["heatmap"] == "" and again[6]["decision"]
  assert not (out / "nut" / "new_heatmap.png").exists()  # heatmaps off


def test_each_image_says_which_calibration_judged_it(trained, tmp_path):
  root, workdir = trained
  loose = tmp_path / "loose"
  loose.mkdir()
  for i in range(3):
    shutil.copy(os.path.join(root, "nut", "test", "good", f"{i:03d}.png"), loose / f"n{i}.png")
  classes = tmp_path / "classes.csv"
  classes.write_text("path,class\nn0.png,nut\n" + f"{loose / 'n1.png'},brick\n")
  out = tmp_path / "out"
  proc = _main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={loose}",
               f"--config.predict.output={out}", f"--config.predict.classes_csv={classes}")
  assert proc.returncode == 0, proc.stdout
  by_name = {os.path.basename(r["image"]): r for r in _rows(out)}
  assert (by_name["n0.png"]["class"], by_name["n0.png"]["class_from"]) == ("nut", "csv")
  assert (by_name["n1.png"]["class"], by_name["n1.png"]["class_from"]) == ("brick", "csv")
  assert (by_name["n2.png"]["class"], by_name["n2.png"]["class_from"]) == (calibration.POOLED, "pooled")
  cals = calibration.load(workdir)
  assert float(by_name["n2.png"]["threshold"]) == pytest.approx(cals[calibration.POOLED].threshold)
  assert "1 images judged by the nut calibration (class from predict.classes_csv" in proc.stdout
  assert "WARNING: 1 images matched no trained class" in proc.stdout
  line = _one_error_line(_main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={loose}",
                               f"--config.predict.output={tmp_path / 'o2'}", "--config.predict.resume=False",
                               f"--config.predict.classes_csv={classes}", "--config.predict.class_name=bolt"))
  assert line == "error: config.predict.class_name='bolt' is not a trained class; known: ['brick', 'nut']."


def test_a_trained_run_is_recalibrated_from_a_folder(trained, tmp_path):
  root, workdir = trained
  before = calibration.load(workdir)["nut"]
  assert before.images_from == "0.2 of train/good held out" and before.num_images == 2
  folder = tmp_path / "normal"
  for name in ("brick", "nut"):
    shutil.copytree(os.path.join(root, name, "test", "good"), folder / name)
  proc = _main(f"--workdir={workdir}", "--mode=eval", f"--config.data.calibration.folder={folder}")
  assert proc.returncode == 0, proc.stdout
  after = calibration.load(workdir)["nut"]
  assert after.num_images == 3 and after.images_from == f"folder {folder} (replaces the 0.2 of train/good held out)"
  saved = json.load(open(os.path.join(workdir, calibration.CALIBRATION_FILE)))
  assert saved["nut"]["images_from"] == after.images_from and saved["nut"]["rank"] == 3
