"""Calibration from normal images: the split, thresholds, normalisation, inspection numbers."""
import importlib
import json
import math
import os
import subprocess
import sys

from matplotlib import image as mpl_image
import numpy as np
import pytest
from scipy import stats

from dinomaly_jax.config import saved as saved_config
from dinomaly_jax.data import calibration as data_calibration
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import synthetic
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError
from dinomaly_jax.errors import IncompatibleWorkdirError
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import html_report
from dinomaly_jax.evaluation import inspection
from dinomaly_jax.evaluation import pictures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n_per_class):
  return [Record(f"/d/{c}/{i:03d}.png", c, 0, "good", None)
          for c, n in n_per_class.items() for i in range(n)]


def test_split_holds_a_fixed_fraction_of_each_class_out():
  records = _records({"a": 30, "b": 10, "c": 2})
  train, held = data_calibration.split_train(records, 0.2)
  count = lambda rs, c: sum(r.class_name == c for r in rs)
  assert [count(held, c) for c in "abc"] == [6, 2, 1]  # round(n * 0.2), at least one each side
  assert [count(train, c) for c in "abc"] == [24, 8, 1]
  assert not set(train) & set(held) and set(train) | set(held) == set(records)
  again_train, again_held = data_calibration.split_train(list(reversed(records)), 0.2)
  assert set(again_held) == set(held)  # a fixed choice per class and file list
  assert data_calibration.split_train(records, 0.0) == (records, [])
  with pytest.raises(DataError, match="class 'x' has 1 training image"):
    data_calibration.split_train(_records({"x": 1}), 0.5)


def test_the_folder_config_holds_calibration_images_out(tmp_path):
  root = synthetic.generate(str(tmp_path), classes=("nut",), image_size=32, n_train=10,
                            n_test_good=1, n_test_bad=1)
  config = importlib.import_module("configs.folder").get_config(None)
  assert config.data.calibration.fraction == 0.2
  for name in ("mvtec", "visa", "realiad"):  # the protocol configs train on all of train/good
    assert not data_calibration.enabled(importlib.import_module(f"configs.{name}").get_config(None).data)
  config.data.root = os.path.join(root, "nut")  # a single class folder
  train = data_index.build_records(config.data, "train")
  held = data_index.build_records(config.data, "calibration")
  assert (len(train), len(held)) == (8, 2) and not {r.image_path for r in train} & {r.image_path for r in held}
  config.data.calibration.fraction = 0.0
  assert len(data_index.build_records(config.data, "train")) == 10
  assert data_index.build_records(config.data, "calibration") == []
  config.data.calibration.folder = os.path.join(root, "nut", "test", "good")  # a folder of normal images
  assert [r.label for r in data_index.build_records(config.data, "calibration")] == [0]
  config.data.calibration.folder = str(tmp_path / "missing")
  with pytest.raises(DataError, match="calibration folder"):
    data_index.build_records(config.data, "calibration")


def test_threshold_at_the_target_fpr_and_normalisation():
  rng = np.random.default_rng(0)
  scores = rng.normal(1.0, 0.1, 2000)
  maps = rng.normal(0.5, 0.05, (2000, 4, 4))
  cal = calibration.calibrate(scores, maps, target_fpr=0.01)
  assert np.mean(scores >= cal.threshold) == pytest.approx(0.01, abs=1e-3)  # 20 of 2000 (one tie margin)
  assert cal.center == pytest.approx(np.median(scores))
  assert cal.normalise(cal.center) == pytest.approx(0.0, abs=1e-6)
  assert cal.normalise(cal.threshold) == pytest.approx(1.0, abs=1e-5)
  low, high = cal.heat_range()
  assert low == pytest.approx(np.median(maps)) and (low + high) / 2 == pytest.approx(cal.threshold)
  fallback = calibration.from_test_labels([0.1, 0.2, 0.9], [0, 0, 1], np.zeros((3, 2, 2)), 0.9)
  assert (fallback.threshold, fallback.center, fallback.source) == (0.9, pytest.approx(0.15),
                                                                    calibration.FROM_TEST_LABELS)


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_the_conformal_threshold_keeps_its_false_positive_promise(target):
  """Over 20,000 simulated calibration sets per N, the FPR of the rule (exact: normal scores,
  FPR = P(score >= threshold)) averages (N + 1 - k) / (N + 1) to within 4 standard errors
  (<= 0.0035), which is <= target once N >= 1/target - 1; one set's FPR exceeds its 95% bound
  in 5% +- 0.62% (4 standard errors) of the sets. The old quantile rule breaks the promise."""
  rng = np.random.default_rng(23)
  trials = 20_000
  for n in (6, 20, 40, 99, 100, 250):
    draws = rng.normal(1.0, 0.1, (trials, n))
    cal = calibration.calibrate(draws[0], np.zeros((n, 2, 2)), target)
    thresholds = np.array([calibration.conformal_threshold(row, target)[0] for row in draws])
    fpr = stats.norm.sf(thresholds, 1.0, 0.1)  # (trials,) each set's exact FPR
    k = min(math.ceil((n + 1) * (1 - target) - 1e-9), n)
    assert cal.rank == k and cal.expected_fpr == pytest.approx((n + 1 - k) / (n + 1))
    standard_error = stats.beta.std(n + 1 - k, k) / math.sqrt(trials)
    assert abs(fpr.mean() - cal.expected_fpr) < 4 * standard_error, (n, fpr.mean(), cal.expected_fpr)
    assert cal.meets_target == (n >= calibration.images_needed(target))
    if cal.meets_target:
      assert fpr.mean() < target + 4 * standard_error
    assert abs(np.mean(fpr > cal.fpr_upper_95) - 0.05) < 4 * math.sqrt(0.05 * 0.95 / trials), n
  assert calibration.images_needed(target) == round(1 / target) - 1  # 99 images for 1%, 19 for 5%
  old = stats.norm.sf(np.quantile(rng.normal(1.0, 0.1, (trials, 20)), 1 - 0.01, axis=1), 1.0, 0.1)
  assert old.mean() > 0.04  # the linear-interpolation quantile of 20 images flagged ~5.6%, not 1%


def test_too_few_calibration_images_say_how_many_would_do():
  cal = calibration.calibrate([0.3, 0.1, 0.2, 0.5, 0.4, 0.6], np.zeros((6, 2, 2)), 0.01)
  assert (cal.threshold, cal.rank, cal.meets_target) == (0.6, 6, False)  # the highest score
  assert cal.expected_fpr == pytest.approx(1 / 7)
  assert calibration.shortfall_warning("nut", cal) == (
      "WARNING: nut: 6 calibration images cannot promise FPR 1%; the threshold is their highest "
      "score (expected FPR 14%); 99 normal images would do.")
  enough = calibration.calibrate(np.arange(99.0), np.zeros((99, 2, 2)), 0.01)
  assert (enough.threshold, enough.expected_fpr, calibration.shortfall_warning("nut", enough)) == (98.0, 0.01, None)


def test_calibration_files_written_before_the_guarantee_still_load(tmp_path):
  (tmp_path / calibration.CALIBRATION_FILE).write_text(json.dumps({"nut": {
      "threshold": 0.5, "center": 0.3, "map_low": 0.1, "source": calibration.FROM_CALIBRATION,
      "num_images": 6, "target_fpr": 0.01}}))
  old = calibration.load(str(tmp_path))["nut"]
  assert old.threshold == 0.5 and np.isnan(old.expected_fpr) and old.rank == 0
  assert calibration.guarantee_text(old).startswith("no FPR guarantee")


def test_calibration_file_round_trips(tmp_path):
  cals = {"a": calibration.calibrate([1.0, 2.0, 3.0], np.ones((3, 2, 2)), 0.05),
          calibration.POOLED: calibration.from_test_labels([1.0, 2.0], [0, 1], np.ones((2, 2, 2)), 2.0)}
  calibration.save(str(tmp_path), cals)
  loaded = calibration.load(str(tmp_path))
  assert loaded["a"] == cals["a"] and np.isnan(loaded[calibration.POOLED].target_fpr)
  with pytest.raises(FileNotFoundError, match="calibration.json"):
    calibration.load(str(tmp_path / "none"))


def test_inspection_numbers_per_class_and_defect_type():
  scores = [0.1, 0.2, 0.3, 0.9, 0.15, 0.8, 0.5]
  labels = [0, 0, 0, 1, 1, 1, 1]
  types = ["good", "good", "good", "crack", "crack", "hole", "hole"]
  cal = calibration.ClassCalibration(threshold=0.25, center=0.2, map_low=0.0, source="x",
                                     num_images=5, target_fpr=0.01)
  pixel = {m: 0.5 for m in inspection.PIXEL_METRICS}
  r = inspection.class_results(scores, labels, types, cal, 0.5, pixel, dict(pixel, AUPRO=0.25))
  assert r["fpr"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(3 / 4)  # 0.3 flagged; 0.15 missed
  assert r["fpr_at_f1"] == 0 and r["recall_at_f1"] == pytest.approx(3 / 4)
  assert r["defects"]["crack"] == {"images": 2, "I-AUROC": pytest.approx(4 / 6), "recall": 0.5}
  assert r["defects"]["hole"] == {"images": 2, "I-AUROC": 1.0, "recall": 1.0}
  assert r["pixel"][">= 0.5"]["AUPRO"] == 0.25 and r["pixel"]["> 0"]["AUPRO"] == 0.5
  text = inspection.markdown({"nut": r})
  assert "| nut | crack | 2 | 66.7 | 50.0 |" in text and "test labels" in text


def test_image_strips_pick_false_positives_misses_and_detections():
  scores = np.array([0.1, 0.9, 0.3, 0.2, 0.95, 0.25])
  labels = np.array([0, 0, 0, 1, 1, 1])
  strips = html_report.strip_choices(scores, labels, threshold=0.5, k=2)
  fp, missed, best = strips.values()
  assert (fp, missed, best) == ([1], [3, 5], [4, 5])  # 0.3 is a normal image below the threshold: not shown
  assert list(strips)[0].startswith("false positives (normal images at or above the threshold")
  assert html_report.strip_choices(scores, labels, threshold=0.99, k=2)["false positives (normal images at "
                                                                        "or above the threshold, highest first)"] == []


def test_bad_calibration_fields_are_one_line_errors(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dinomaly_jax.main", "--config=configs/folder.py", f"--workdir={tmp_path}",
       "--config.data.root=/nonexistent", "--config.data.calibration.fraction=0.95"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.data.calibration.fraction must be a number in [0.0, 0.9], got 0.95.")
  assert "Traceback" not in proc.stderr


def test_heatmaps_share_the_class_scale_not_a_per_image_one(tmp_path):
  cal = calibration.ClassCalibration(threshold=0.5, center=0.3, map_low=0.1, source="x",
                                     num_images=5, target_fpr=0.01)
  image = np.full((8, 8, 3), 100, np.uint8)
  quiet, loud = np.full((8, 8), 0.2, np.float32), np.full((8, 8), 0.2, np.float32)
  loud[:2, :2] = 3.0  # a hot corner: a per-image scale would darken the rest
  paths = [str(tmp_path / f"{n}.png") for n in ("quiet", "loud")]
  for path, amap in zip(paths, (quiet, loud)):
    pictures.save_heatmap(path, image, amap, cal.threshold, scale=cal.heat_range())
  a, b = (mpl_image.imread(p)[:, 8:] for p in paths)  # the overlay half
  np.testing.assert_array_equal(a[4:, 4:], b[4:, 4:])  # equal map values, equal colours
  expected = pictures.overlay(image[:1, :1], quiet[:1, :1], *cal.heat_range())[0, 0] / 255
  np.testing.assert_allclose(a[5, 5, :3], expected, atol=1 / 255)


def test_workdirs_saved_before_calibration_resume_and_may_calibrate_later(tmp_path):
  config = importlib.import_module("configs.mvtec").get_config()
  saved = json.loads(config.to_json())
  del saved["data"]["calibration"]  # as written before the calibration split and the spike guard
  for k in [k for k in saved["train"] if k.startswith("spike_")]:
    del saved["train"][k]
  (tmp_path / saved_config.CONFIG_FILE).write_text(json.dumps(saved))
  saved_config.check_compatible(str(tmp_path), config)  # resumes
  config.data.calibration.folder = "/data/normal_only"  # calibrating a trained run later is allowed
  saved_config.check_compatible(str(tmp_path), config)
  config.data.calibration.fraction = 0.2  # a different training set is not
  with pytest.raises(IncompatibleWorkdirError, match="config.data.calibration.fraction: saved 0.0, now 0.2"):
    saved_config.check_compatible(str(tmp_path), config)


def test_file_names_with_dollar_signs_are_text_not_mathtext(tmp_path):
  """A name such as "lot $5 $x^{" (unbalanced mathtext) used to crash evaluation after scoring."""
  image = np.zeros((8, 8, 3), np.uint8)
  names = ["lot $x^{$ b.png", "a_$\\frac$.png"]
  paths = pictures.save_strips(str(tmp_path), "nut$", np.stack([image] * 2), np.zeros((2, 8, 8)),
                               np.zeros((2, 8, 8), np.float32), 0.5, names)
  assert len(paths) == 2 and all(os.path.getsize(p) for p in paths)
  fig = pictures.score_figure("nut $x^{", np.array([0.1, 0.9]), np.array([0, 1]), {"t": 0.5})
  pictures._save(fig, str(tmp_path / "scores.png"))
