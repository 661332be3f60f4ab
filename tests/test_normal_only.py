"""A normal-only start through the command line: train and calibrate with normal images only
(no test folder), then predict and export from that run."""
import csv
import json
import os
import shutil

from dinomaly_jax.evaluation import calibration
from tests import main_helpers
from tests.test_command_line import _main
from tests.test_command_line import _one_error_line


def _normal_only(root):
  """The tiny dataset without its test and ground_truth folders."""
  root = main_helpers.tiny_dataset(root)
  for name in ("brick", "nut"):
    for folder in ("test", "ground_truth"):
      shutil.rmtree(os.path.join(root, name, folder), ignore_errors=True)
  return root


def test_normal_only_run_trains_calibrates_predicts_and_exports(tmp_path):
  root = _normal_only(tmp_path / "data")
  workdir = tmp_path / "run"
  proc = _main(f"--config=tests/tiny_config.py:{root}", f"--workdir={workdir}", "--config.data.workers=0",
               "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.eval_every=0", "--config.data.calibration.fraction=0.25")
  assert proc.returncode == 0, proc.stdout
  skipped = [line for line in proc.stdout.splitlines() if "evaluation skipped" in line]
  assert skipped == ["No test images (a normal-only run): evaluation skipped; the thresholds come from the "
                     "calibration images (0.25 of train/good held out)."], proc.stdout
  assert "WARNING: nut: 2 calibration images cannot promise FPR 1%" in proc.stdout
  assert not (workdir / "eval").exists()  # no test images, no report
  cals = calibration.load(str(workdir))
  assert set(cals) == {"brick", "nut", calibration.POOLED}
  assert all(c.source == calibration.FROM_CALIBRATION for c in cals.values())
  assert cals["nut"].num_images == 2 and cals[calibration.POOLED].num_images == 4

  images = os.path.join(root, "nut", "train", "good")
  proc = _main(f"--workdir={workdir}", "--mode=predict", f"--config.predict.input={images}",
               f"--config.predict.output={tmp_path / 'pred'}", "--config.predict.class_name=nut")
  assert proc.returncode == 0, proc.stdout
  rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
  assert len(rows) == 8 and {r["class"] for r in rows} == {"nut"}
  proc = _main(f"--workdir={workdir}", "--mode=export")
  assert proc.returncode == 0, proc.stdout
  info = json.load(open(workdir / "export" / "export_info.json"))
  assert "nut" in info["classes"]


def test_normal_only_single_class_folder_and_its_one_line_errors(tmp_path):
  root = _normal_only(tmp_path / "data")
  single = os.path.join(root, "nut")  # configs/folder.py: a class folder with train/good only
  proc = _main("--config=configs/folder.py:vit=small", f"--workdir={tmp_path / 'run'}",
               f"--config.data.root={single}", "--config.random_encoder=True", "--config.model.vit=small", "--config.model.registers=0", "--config.data.crop=56",
               "--config.data.resize=64", "--config.train.steps=1", "--config.train.batch_size=2",
               "--config.eval.batch_size=2", "--config.data.workers=0", "--config.train.warmup_steps=0")
  assert proc.returncode == 0, proc.stdout
  assert "evaluation skipped" in proc.stdout
  assert set(calibration.load(str(tmp_path / "run"))) == {"nut", calibration.POOLED}
  # No test images and nothing held out: no thresholds could be made, said before training.
  line = _one_error_line(_main(f"--config=tests/tiny_config.py:{root}", f"--workdir={tmp_path / 'r2'}",
                               "--config.data.calibration.fraction=0.0"))
  assert line == (f"error: {root}: no test images (a normal-only run) and no calibration split: set "
                  "config.data.calibration.fraction (e.g. 0.2) or config.data.calibration.folder, so that "
                  "the thresholds come from normal images.")
  # Some classes tested, others not: a mistake, named.
  os.makedirs(os.path.join(root, "brick", "test", "good"))
  shutil.copy(os.path.join(root, "brick", "train", "good", "000.png"), os.path.join(root, "brick", "test", "good"))
  line = _one_error_line(_main(f"--config=tests/tiny_config.py:{root}", f"--workdir={tmp_path / 'r3'}"))
  assert "class(es) ['nut'] have no test images while ['brick'] have" in line
