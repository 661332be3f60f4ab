"""The reference AUPRO computed directly: one labelling and one pass per threshold.

Slow by design: it checks the vectorised `dinomaly_jax.evaluation.aupro` (tests) and
is the baseline of its speed-up (benchmarks/metrics_benchmark.py).
"""
import numpy as np
from skimage import measure
from sklearn import metrics as skm


def direct_reference_aupro(maps, masks, max_fpr, num):
  """Dinomaly's definition, one labelling and one pass per threshold (skimage, 8-connected).

  Thresholds as numpy 1.x (the reference's) builds `arange(min, max, (max - min) / num)`
  from float32 extremes: a float64 step, thresholds compared with the maps in float32.
  """
  lo, hi = maps.min(), maps.max()
  fprs, pros = [], []
  for th in np.arange(lo, hi, np.float64(hi - lo) / num).astype(np.float32):
    binary = maps > th
    overlaps = [binary[i][tuple(region.coords.T)].sum() / region.area
                for i in range(len(masks)) for region in measure.regionprops(measure.label(masks[i]))]
    pros.append(np.mean(overlaps))
    fprs.append(np.logical_and(binary, ~masks).sum() / (~masks).sum())
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs < max_fpr
  return skm.auc(fprs[keep] / fprs[keep].max(), pros[keep])
