"""Results a quality engineer reads: decisions at the calibrated threshold, per defect type.

Per class: the threshold and where it comes from (calibration images, or test labels
when there is no calibration split), the false-positive rate on the normal test images
and the recall on the defective ones at that threshold, the same two at the F1-optimal
threshold (which uses the test labels: a comparison, not a deployable setting); per
defect type the image AUROC against the normal test images and the recall; the pixel
metrics under both ground-truth conventions: `> 0` after the bilinear resize (the
reference's, as published) and `>= 0.5`.
"""
import math

import numpy as np

from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import metrics
from dinomaly_jax.evaluation.calibration import ClassCalibration

PIXEL_METRICS = ("P-AUROC", "P-AP", "P-F1max", "AUPRO")
CONVENTIONS = ("> 0", ">= 0.5")  # ground truth after the bilinear resize


def _rate(flags: np.ndarray) -> float:
  return float(np.mean(flags)) if flags.size else math.nan


def class_results(scores, labels, defect_types, cal: ClassCalibration, f1_threshold: float,
                  pixel_default: dict, pixel_half: dict) -> dict:
  """One class's inspection numbers (fractions; NaN where undefined).

  Args:
    scores: (N,) image scores of the test images. labels: (N,) 0 normal / 1 anomalous.
    defect_types: (N,) defect type names ("good" for normal images).
    cal: the class's calibration (threshold, normalisation).
    f1_threshold: the F1-optimal image threshold on these test images.
    pixel_default, pixel_half: class_metrics results under the `> 0` and `>= 0.5` masks.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
  defect_types = np.asarray(defect_types)
  flagged, flagged_f1 = scores >= cal.threshold, scores >= f1_threshold
  defects = {}
  for d in sorted(set(defect_types[labels])):
    pick = labels & (defect_types == d)
    both = pick | ~labels
    defects[d] = {"images": int(pick.sum()),
                  "I-AUROC": float(metrics.image_auroc(scores[both], labels[both])),
                  "recall": _rate(flagged[pick])}
  return {
      "threshold": cal.threshold, "threshold_source": cal.source,
      "calibration_images": cal.num_images, "center": cal.center, "target_fpr": cal.target_fpr,
      "expected_fpr": cal.expected_fpr, "fpr_upper_95": cal.fpr_upper_95,
      "guarantee": calibration.guarantee_text(cal),
      "meets_target": None if math.isnan(cal.expected_fpr) else cal.meets_target,
      "normal_test_images": int((~labels).sum()), "anomalous_test_images": int(labels.sum()),
      "fpr": _rate(flagged[~labels]), "recall": _rate(flagged[labels]),
      "f1_threshold": float(f1_threshold), "fpr_at_f1": _rate(flagged_f1[~labels]),
      "recall_at_f1": _rate(flagged_f1[labels]), "defects": defects,
      "pixel": {CONVENTIONS[0]: {m: pixel_default[m] for m in PIXEL_METRICS},
                CONVENTIONS[1]: {m: pixel_half[m] for m in PIXEL_METRICS}},
  }


def _pct(v: float) -> str:
  return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def decision_rows(inspection: dict) -> list[list[str]]:
  """[class, threshold, source, images, promised FPR, its 95% bound, FPR, recall, FPR@F1, recall@F1]
  rows (percent)."""
  return [[name, f"{r['threshold']:.4g}", r["threshold_source"], str(r["calibration_images"]),
           _pct(r.get("target_fpr")), _pct(r.get("expected_fpr")), _pct(r.get("fpr_upper_95")),
           _pct(r["fpr"]), _pct(r["recall"]), _pct(r["fpr_at_f1"]), _pct(r["recall_at_f1"])]
          for name, r in inspection.items()]


DECISION_HEADER = ["class", "threshold", "threshold from", "images", "target FPR %", "expected FPR %",
                   "FPR 95% bound %", "FPR normal test %", "recall %", "FPR @F1 (test labels) %",
                   "recall @F1 (test labels) %"]
GUARANTEE_NOTE = (
    "Expected FPR: the chance that a new normal image, drawn like the calibration images, scores at "
    "or above the threshold, averaged over calibration sets: (N + 1 - k) / (N + 1) for the k-th "
    "smallest of N calibration scores, k = ceil((N + 1)(1 - target)), at most the target when "
    "N >= 1/target - 1. The FPR of this one calibration set is random; it stays below the 95% bound "
    "for 95% of calibration sets. The FPR on the normal test images is a small-sample estimate of it.")


def warnings(inspection: dict) -> list[str]:
  """The one-line warnings of classes with too few calibration images for their target."""
  return [calibration.shortfall_line(name, r["calibration_images"], r["target_fpr"], r["expected_fpr"])
          for name, r in inspection.items() if r.get("meets_target") is False]


def defect_rows(inspection: dict) -> list[list[str]]:
  """[class, defect type, images, I-AUROC, recall at the calibrated threshold] rows."""
  return [[name, d, str(v["images"]), _pct(v["I-AUROC"]), _pct(v["recall"])]
          for name, r in inspection.items() for d, v in r["defects"].items()]


DEFECT_HEADER = ["class", "defect type", "images", "I-AUROC %", "recall %"]


def pixel_rows(inspection: dict) -> list[list[str]]:
  """[class, metric under > 0, metric under >= 0.5, ...] rows, side by side."""
  return [[name] + [_pct(r["pixel"][c][m]) for m in PIXEL_METRICS for c in CONVENTIONS]
          for name, r in inspection.items()]


PIXEL_HEADER = ["class"] + [f"{m} {c} %" for m in PIXEL_METRICS for c in CONVENTIONS]


def _md_table(header, rows) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
          *("| " + " | ".join(r) + " |" for r in rows), ""]


def markdown(inspection: dict) -> str:
  """The inspection sections of report.md."""
  return "\n".join([
      "## Decisions at the calibrated threshold", "",
      "An image is anomalous when its score is >= the threshold (normalised score >= 1). "
      "FPR: share of the normal test images flagged; recall: share of the defective ones. "
      "The F1-optimal columns use the test labels to choose the threshold: a comparison, "
      "not a setting you could deploy.", "", GUARANTEE_NOTE, "",
      *(f"**{w}**\n" for w in warnings(inspection)),
      *_md_table(DECISION_HEADER, decision_rows(inspection)),
      "## Per defect type (image AUROC against the normal test images, recall at the calibrated threshold)", "",
      *_md_table(DEFECT_HEADER, defect_rows(inspection)),
      "## Pixel metrics under both ground-truth conventions", "",
      "`> 0`: mask pixels > 0 after the bilinear resize (the reference's convention, as published; "
      "the main table); `>= 0.5`: pixels at least half the mask value.", "",
      *_md_table(PIXEL_HEADER, pixel_rows(inspection)),
  ])


def summary_lines(inspection: dict) -> list[str]:
  """A short printed summary: one line per class."""
  return [f"{name}: threshold {r['threshold']:.4g} ({r['threshold_source']}; "
          f"{r.get('guarantee', 'no FPR guarantee recorded')}), FPR on normal test "
          f"images {_pct(r['fpr'])}%, recall {_pct(r['recall'])}%" for name, r in inspection.items()
          ] + warnings(inspection)
