"""AUPRO, vectorised: ground truth regions labelled once, overlaps from counts.

Regions are the 8-connected components of each mask (skimage.measure.label's
default in the reference), labelled once per non-empty mask with scipy. PRO at a
threshold t is the mean over all regions of the class of the fraction of region
pixels scoring > t; FPR is the fraction of normal pixels scoring > t.

- "reference" (Dinomaly utils.compute_pro): thresholds `np.arange(min, max,
  (max - min) / n)` over all maps of the class, with the numpy 1.x float semantics
  the reference ran with (rounding can yield n + 1 of them); keep points with
  FPR < max_fpr; divide FPR by its own max; trapezoid area. Pixels above each
  threshold are counted by binary search in the sorted pixel keys; anomalous pixels
  are binned once by `searchsorted` into the thresholds they exceed, one bincount
  gives per-region counts per bin, a reversed cumsum the counts above every threshold.
- "mvtec" (MVTec-AD evaluation code): the exact curve over every distinct score,
  from (0, 0) to (1, 1), integrated up to FPR = max_fpr (the last segment
  interpolated), divided by max_fpr. One walk over the sorted pixel keys.
Both are NaN (with a warning) when the masks have no anomalous or no normal pixel,
or all maps are constant (reference).
"""
import warnings

import numpy as np
from scipy import ndimage

from dinomaly_jax.evaluation import score_sort

_EIGHT_CONNECTED = np.ones((3, 3), bool)  # skimage.measure.label's default in 2-d


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W) bool -> region ids (N, H, W) int32 (0 = normal, unique over the stack), areas (K+1,)."""
  regions = np.zeros(masks.shape, np.int32)
  num_regions = 0
  for i in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):  # each non-empty mask once
    labelled, num = ndimage.label(masks[i], structure=_EIGHT_CONNECTED, output=np.int32)
    regions[i] = np.where(labelled > 0, labelled + num_regions, 0)
    num_regions += num
  return regions, np.bincount(regions.reshape(-1), minlength=num_regions + 1)


def _degenerate(reason: str) -> float:
  warnings.warn(f"AUPRO is NaN: {reason}.", stacklevel=3)
  return np.nan


def reference_thresholds(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
  """The reference's thresholds as it ran (numpy 1.x), ascending float32.

  It evaluates `np.arange(min, max, (max - min) / n)` on float32 extremes: numpy 1.x
  makes the step float64 (numpy 2 would keep it float32) and compares the float32
  maps with each threshold in float32. Checked against numpy 1.26 on 20,000 random
  ranges (1,259 of them with n + 1 thresholds): identical thresholds.
  """
  lo, hi = maps.min(), maps.max()
  return np.arange(lo, hi, np.float64(hi - lo) / num_thresholds).astype(np.float32)


def aupro_reference(maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3,
                    num_thresholds: int = 200, keys=None) -> float:
  """Dinomaly's AUPRO. maps (N, H, W) float32, masks (N, H, W) bool.

  keys: `score_sort.sorted_keys(maps)` if already computed (saves one sort).
  """
  maps = np.asarray(maps, np.float32)
  regions, areas = label_regions(masks)
  num_regions = areas.size - 1
  n_normal = int(areas[0])
  if num_regions == 0 or n_normal == 0:
    return _degenerate("the masks need both anomalous and normal pixels")
  if maps.min() == maps.max():
    return _degenerate("all anomaly maps are constant")
  keys = score_sort.sorted_keys(maps, name="anomaly maps") if keys is None else keys
  thresholds = reference_thresholds(maps, num_thresholds)  # (T,)
  above_all = score_sort.count_above(keys, thresholds)  # (T,) pixels > each threshold
  flat_regions = regions.reshape(-1)
  inside = np.flatnonzero(flat_regions)  # anomalous pixels only
  exceeded = np.searchsorted(thresholds, maps.reshape(-1)[inside], side="left")  # thresholds < score
  bins = thresholds.size + 1
  counts = np.bincount((flat_regions[inside] - 1).astype(np.int64) * bins + exceeded,
                       minlength=num_regions * bins).reshape(num_regions, bins)
  above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (K, T) region pixels > thresholds
  fpr = (above_all - above.sum(axis=0)) / n_normal
  pro = np.mean(above / areas[1:, None], axis=0)
  keep = fpr < max_fpr
  if not keep.any() or fpr[keep].max() == 0:
    return _degenerate(f"no threshold gives 0 < FPR < {max_fpr}")
  x = fpr[keep] / fpr[keep].max()
  y = pro[keep]
  return float(np.sum(np.abs(np.diff(x)) * (y[1:] + y[:-1]) / 2))


def aupro_mvtec(maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3,
                keys=None) -> float:
  """MVTec-AD AUPRO: exact PRO curve integrated to max_fpr, divided by max_fpr.

  keys: `score_sort.sorted_keys(maps)` if already computed (saves one sort).
  """
  regions, areas = label_regions(masks)
  num_regions = areas.size - 1
  n_normal = int(areas[0])
  if num_regions == 0 or n_normal == 0:
    return _degenerate("the masks need both anomalous and normal pixels")
  keys = score_sort.sorted_keys(maps, name="anomaly maps") if keys is None else keys
  weights = np.concatenate([[0.0], 1.0 / (areas[1:] * num_regions)])  # PRO gain per pixel
  flat_regions = regions.reshape(-1)
  area = 0.0
  x_prev = y_prev = 0.0
  fp_seen, pro_seen = 0, 0.0
  for idx, _, run_end, _ in score_sort.descending_runs(keys):
    region = flat_regions[idx]
    ends = np.flatnonzero(run_end)
    fp_cum = fp_seen + np.cumsum(region == 0, dtype=np.int64)
    pro_cum = pro_seen + np.cumsum(weights[region])
    fp_seen, pro_seen = int(fp_cum[-1]), float(pro_cum[-1])
    if not ends.size:
      continue
    fps, pros = fp_cum[ends], pro_cum[ends]
    x = np.concatenate([[x_prev], np.minimum(fps / n_normal, 1.0)])
    y = np.concatenate([[y_prev], np.minimum(pros, 1.0)])
    beyond = np.flatnonzero(x > max_fpr)
    if beyond.size:
      return (area + _area_to(x[:beyond[0] + 1], y[:beyond[0] + 1], max_fpr)) / max_fpr
    area += float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    x_prev, y_prev = x[-1], y[-1]
  return (area + _area_to(np.array([x_prev, 1.0]), np.array([y_prev, 1.0]), max_fpr)) / max_fpr


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoid area of the curve up to x_max; only the last segment may cross it."""
  full = float(np.sum(np.diff(x[:-1]) * (y[1:-1] + y[:-2]) / 2))
  x0, x1, y0, y1 = x[-2], x[-1], y[-2], y[-1]
  if x1 <= x_max:
    return full + (x1 - x0) * (y0 + y1) / 2
  y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
  return full + (x_max - x0) * (y0 + y_max) / 2
