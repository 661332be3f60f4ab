"""The seven metrics of the protocol, exact and memory-lean enough for Real-IAD classes.

Image and pixel AUROC / AP / F1-max are computed from one sort of the scores (see
`score_sort`), with scikit-learn's semantics: tied scores are one threshold, AP is
the step integral of the PR curve, AUROC the trapezoid area of the ROC curve (here
from integer counts, so exact to float64 division), F1-max the maximum over the PR
curve of 2PR / (P + R + 1e-7). Memory: 8 bytes per pixel for the sort keys plus 4
for the region ids of AUPRO and chunked temporaries: 131M pixels (2,000 maps of
256^2) measured 2.6 GiB beyond the 0.6 GiB of maps and masks, so no binned
approximation is needed (benchmarks/metrics_benchmark.py).

Degenerate classes: when the labels (image level) or the masks (pixel level) hold
only one class, the affected metrics are NaN and a warning names them.
"""
import warnings

import numpy as np

from dinomaly_jax.evaluation import aupro as aupro_lib
from dinomaly_jax.evaluation import score_sort

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
AUPRO_MODES = ("reference", "mvtec")
F1_EPS = 1e-7


def ranking_metrics(keys: np.ndarray, num_positive: int) -> dict[str, float]:
  """AUROC, AP, F1-max and the F1-optimal threshold from sorted keys holding the labels.

  The threshold is the lowest score reaching the F1 maximum (scikit-learn's
  `thresholds[argmax(f1)]`); predict `score >= threshold` as anomalous.
  """
  n_pos = int(num_positive)
  n_neg = keys.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return {"auroc": np.nan, "ap": np.nan, "f1max": np.nan, "f1_threshold": np.nan}
  auc_twice = 0  # sum over ROC segments of d(fp) * (tp_a + tp_b): exact integer
  ap = 0.0
  best_f1, best_threshold = -1.0, np.nan
  tp_prev = fp_prev = 0
  tp_seen = n_seen = 0
  for _, positive, run_end, ordered in score_sort.descending_runs(keys):
    ends = np.flatnonzero(run_end)
    tps = tp_seen + np.cumsum(positive, dtype=np.int64)[ends]  # (m,) at each threshold
    fps = n_seen + ends + 1 - tps
    tp_seen += int(np.count_nonzero(positive))
    n_seen += positive.size
    if not ends.size:
      continue
    tp_all = np.concatenate([[tp_prev], tps])
    fp_all = np.concatenate([[fp_prev], fps])
    auc_twice += int(np.sum(np.diff(fp_all) * (tp_all[1:] + tp_all[:-1])))
    precision = tps / (tps + fps)
    recall = tps / n_pos
    ap += float(np.sum(np.diff(tp_all) / n_pos * precision))
    f1 = 2 * precision * recall / (precision + recall + F1_EPS)
    last_max = f1.size - 1 - int(np.argmax(f1[::-1]))
    if f1[last_max] >= best_f1:  # later chunks hold lower thresholds: they win ties
      best_f1 = float(f1[last_max])
      best_threshold = float(score_sort.key_values(ordered[ends[last_max]:ends[last_max] + 1])[0])
    tp_prev, fp_prev = int(tps[-1]), int(fps[-1])
  return {"auroc": auc_twice / (2.0 * n_pos * n_neg), "ap": max(0.0, ap), "f1max": best_f1,
          "f1_threshold": best_threshold}


def _check_1d(scores, labels):
  scores = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f"Image scores {scores.shape} and labels {labels.shape} must have the "
                     "same length (one score and one 0/1 label per test image).")
  return scores, labels > 0


def _image_ranking(scores, labels) -> dict[str, float]:
  scores, labels = _check_1d(scores, labels)
  keys = score_sort.sorted_keys(scores, labels, "image scores")
  return ranking_metrics(keys, np.count_nonzero(labels))


def image_auroc(scores, labels) -> float:
  """Image AUROC (NaN if one class only)."""
  return _image_ranking(scores, labels)["auroc"]


def image_f1_threshold(scores, labels) -> float:
  """The image score threshold reaching F1-max (saved for prediction); NaN if one class only."""
  return _image_ranking(scores, labels)["f1_threshold"]


def class_metrics(scores, labels, maps, masks, *, aupro: str = "reference",
                  aupro_max_fpr: float = 0.3, aupro_thresholds: int = 200,
                  with_thresholds: bool = False):
  """The seven metrics of one class (and, with_thresholds, the F1-optimal thresholds).

  Returns {metric: value}, or with_thresholds ({metric: value}, {"image": t, "pixel": t}):
  the image-score and pixel thresholds reaching I-F1max and P-F1max (NaN if undefined).

  Args:
    scores: (N,) image scores. labels: (N,) 0 normal / 1 anomalous.
    maps: (N, H, W) float anomaly maps. masks: (N, H, W) ground truth, anomalous where > 0.
    aupro: "reference" (Dinomaly's compute_pro) or "mvtec" (exact curve, MVTec-AD).
  """
  if aupro not in AUPRO_MODES:
    raise ValueError(f"eval.aupro must be one of {AUPRO_MODES}, got {aupro!r}.")
  maps = np.asarray(maps, np.float32)
  masks = np.asarray(masks)
  if maps.ndim != 3 or maps.shape != masks.shape or maps.shape[0] != np.size(scores):
    raise ValueError(f"Expected maps and masks of shape (N, H, W) with N = {np.size(scores)} "
                     f"images; got maps {maps.shape}, masks {masks.shape}.")
  image = _image_ranking(scores, labels)
  if image["f1max"] != image["f1max"]:
    warnings.warn("Image metrics are NaN: the class's test images are all normal or all "
                  "anomalous.", stacklevel=2)
  masks = masks > 0
  keys = score_sort.sorted_keys(maps, masks, "anomaly maps")
  pixel = ranking_metrics(keys, np.count_nonzero(masks))
  if pixel["f1max"] != pixel["f1max"]:
    warnings.warn("Pixel metrics and AUPRO are NaN: the ground truth masks of the class are "
                  "all normal (or all anomalous).", stacklevel=2)
    pro = np.nan
  elif aupro == "reference":
    pro = aupro_lib.aupro_reference(maps, masks, max_fpr=aupro_max_fpr,
                                    num_thresholds=aupro_thresholds, keys=keys)
  else:
    pro = aupro_lib.aupro_mvtec(maps, masks, max_fpr=aupro_max_fpr, keys=keys)
  values = (image["auroc"], image["ap"], image["f1max"], pixel["auroc"], pixel["ap"],
            pixel["f1max"], pro)
  result = {name: float(v) for name, v in zip(METRIC_NAMES, values)}
  if with_thresholds:
    return result, {"image": image["f1_threshold"], "pixel": pixel["f1_threshold"]}
  return result
