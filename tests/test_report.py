"""Report files are written, parse, and carry the mean and published rows."""
import csv
import json
import math

import numpy as np
import pytest

from dinomaly_jax.evaluation import report
from dinomaly_jax.evaluation.metrics import METRIC_NAMES


def _per_class(names, seed=0):
  rng = np.random.default_rng(seed)
  return {n: dict(zip(METRIC_NAMES, rng.uniform(0.5, 1.0, len(METRIC_NAMES)).tolist())) for n in names}


def test_report_files_parse_and_hold_mean_and_published_rows(tmp_path, capsys):
  per_class = _per_class(["bottle", "cable", "screw"])
  per_class["screw"]["AUPRO"] = math.nan
  result = report.write_report(str(tmp_path), per_class, dataset="mvtec", extra={"vit": "base"}, step=7)
  expected_mean = {m: np.nanmean([v[m] for v in per_class.values()]) for m in METRIC_NAMES}
  assert result["mean"] == pytest.approx(expected_mean, abs=1e-15)
  assert result["classes"]["cable"] == per_class["cable"] and result["step"] == 7

  data = json.loads((tmp_path / "report.json").read_text())  # strict: NaN written as null
  assert data["classes"]["screw"]["AUPRO"] is None
  assert data["published"]["mean"]["I-AUROC"] == pytest.approx(0.996)
  assert data["extra"] == {"vit": "base"}

  rows = list(csv.DictReader((tmp_path / "report.csv").open()))
  assert [r["class"] for r in rows] == ["bottle", "cable", "screw", "mean", "published", "difference"]
  assert float(rows[3]["P-AP"]) == pytest.approx(100 * expected_mean["P-AP"], abs=1e-4)
  assert rows[2]["AUPRO"] == "" and float(rows[4]["AUPRO"]) == pytest.approx(94.8)
  assert float(rows[5]["I-AP"]) == pytest.approx(float(rows[3]["I-AP"]) - 99.8, abs=2e-4)

  md = (tmp_path / "report.md").read_text()
  assert "| class | " + " | ".join(METRIC_NAMES) + " |" in md and "| **published** |" in md
  out = capsys.readouterr().out
  assert "step 7" in out and "AUPRO undefined" in out and "screw" in out


@pytest.mark.parametrize("dataset,names", [("mvtec", ["bottle", "not_mvtec"]), ("folder", ["a"]),
                                           (None, ["bottle"])])
def test_no_published_row_when_not_comparable(tmp_path, dataset, names):
  result = report.write_report(str(tmp_path), _per_class(names), dataset=dataset)
  assert result["published"] is None
  rows = list(csv.DictReader((tmp_path / "report.csv").open()))
  assert [r["class"] for r in rows] == [*names, "mean"]


def test_bad_input_raises_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no classes"):
    report.write_report(str(tmp_path), {}, dataset="mvtec")
  with pytest.raises(ValueError, match="lacks metrics"):
    report.write_report(str(tmp_path), {"bottle": {"I-AUROC": 1.0}}, dataset="mvtec")


def test_pictures_are_written(tmp_path):
  from matplotlib import image as mpl_image  # pylint: disable=g-import-not-at-top

  from dinomaly_jax.evaluation import pictures  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  maps = rng.random((2, 32, 32), dtype=np.float32)
  masks = (maps > 0.8).astype(np.uint8)
  paths = pictures.save_strips(str(tmp_path), "bottle", images, masks, maps, 0.5,
                               ["test/broken/000.png", "test/good/001.png"])
  assert [p.split("/")[-1] for p in paths] == ["00_test_broken_000.png", "01_test_good_001.png"]
  assert mpl_image.imread(paths[0]).shape[:2] == (340, 1200)
  scores, labels = rng.random(20), np.arange(20) % 3 == 0
  assert mpl_image.imread(pictures.save_score_plots(str(tmp_path), "bottle", scores, labels)).ndim == 3
  pictures.save_score_plots(str(tmp_path), "all_normal", scores, np.zeros(20))  # no curves, no error
  heatmap = str(tmp_path / "pred" / "x_heatmap.png")
  pictures.save_heatmap(heatmap, images[0, :, :20], maps[0, :, :20], 0.5)
  assert mpl_image.imread(heatmap).shape[:2] == (32, 40)
  # Overlay: half image, half jet colour of the map on the 0..2*threshold scale.
  painted = pictures.overlay(np.zeros((1, 1, 3), np.uint8), np.array([[1.0]]), 0.0, 2.0)
  np.testing.assert_array_equal(painted[0, 0], np.round(127.5 * np.array(pictures.CMAP(0.5)[:3])))
