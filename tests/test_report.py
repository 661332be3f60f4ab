"""Report files are written, parse, and carry the mean and published rows."""
import csv
import json
import math

import numpy as np
import pytest

from dinomaly_jax import report
from dinomaly_jax.metrics import METRIC_NAMES


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
