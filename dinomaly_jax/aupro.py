"""AUPRO, vectorised: ground truth regions labelled once, overlaps from counts.

Regions are the 8-connected components of each mask (skimage.measure.label's
default in the reference), labelled in one scipy call over the stack with no
connection across masks. PRO at a threshold t is the mean over all regions of the
class of the fraction of region pixels scoring > t; FPR is the fraction of normal
pixels scoring > t.

- "reference" (Dinomaly utils.compute_pro): thresholds `np.arange(min, max,
  (max - min) / n)` over all maps of the class (numpy's float rounding can yield
  n + 1 of them); keep points with FPR < max_fpr; divide FPR by its own max;
  trapezoid area. Each pixel is binned once by `searchsorted` into the thresholds
  it exceeds, one bincount gives per-region counts per bin, a reversed cumsum the
  counts above every threshold.
- "mvtec" (MVTec-AD evaluation code): the exact curve over every distinct score,
  from (0, 0) to (1, 1), integrated up to FPR = max_fpr (the last segment
  interpolated), divided by max_fpr. One walk over the sorted pixel keys.
Both are NaN (with a warning) when the masks have no anomalous or no normal pixel,
or all maps are constant (reference).
"""
import warnings

import numpy as np
from scipy import ndimage

from dinomaly_jax import score_sort

_IMAGES_PER_CHUNK = 64


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W) bool -> region ids (N, H, W) int32 (0 = normal, unique over the stack), areas (K+1,)."""
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = True  # 8-connectivity inside each mask, none between masks
  regions, num = ndimage.label(masks, structure=structure, output=np.int32)
  areas = np.bincount(regions.reshape(-1), minlength=num + 1)
  return regions, areas


def _degenerate(reason: str) -> float:
  warnings.warn(f"AUPRO is NaN: {reason}.", stacklevel=3)
  return np.nan


def reference_thresholds(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
  """The reference's thresholds, built exactly as it builds them (ascending)."""
  lo, hi = maps.min(), maps.max()
  return np.arange(lo, hi, (hi - lo) / num_thresholds)


def aupro_reference(maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3,
                    num_thresholds: int = 200) -> float:
  """Dinomaly's AUPRO. maps (N, H, W) float32, masks (N, H, W) bool."""
  regions, areas = label_regions(masks)
  num_regions = areas.size - 1
  n_normal = int(areas[0])
  if num_regions == 0 or n_normal == 0:
    return _degenerate("the masks need both anomalous and normal pixels")
  if maps.min() == maps.max():
    return _degenerate("all anomaly maps are constant")
  thresholds = reference_thresholds(maps, num_thresholds)  # (T,)
  bins = thresholds.size + 1  # bin b: pixels above exactly the thresholds 0..b-1
  counts = np.zeros(areas.size * bins, np.int64)  # (K+1) x bins, row 0 = normal pixels
  for lo in range(0, maps.shape[0], _IMAGES_PER_CHUNK):
    chunk = slice(lo, lo + _IMAGES_PER_CHUNK)
    exceeded = np.searchsorted(thresholds, maps[chunk].reshape(-1), side="left")  # thresholds < score
    flat_ids = regions[chunk].reshape(-1).astype(np.int64) * bins + exceeded
    counts += np.bincount(flat_ids, minlength=counts.size)
  counts = counts.reshape(areas.size, bins)
  above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (K+1, T): pixels > thresholds[t]
  fpr = above[0] / n_normal
  pro = np.mean(above[1:] / areas[1:, None], axis=0)
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
  keys = score_sort.sorted_keys(maps, "anomaly maps") if keys is None else keys
  weights = np.concatenate([[0.0], 1.0 / (areas[1:] * num_regions)])  # PRO gain per pixel
  flat_regions = regions.reshape(-1)
  area = 0.0
  x_prev = y_prev = 0.0
  fp_seen, pro_seen = 0, 0.0
  for idx, run_end, _ in score_sort.descending_runs(keys):
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
