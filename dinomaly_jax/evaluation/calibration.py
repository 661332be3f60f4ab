"""Decision thresholds and score normalisation per class, from normal images only.

From the image scores and anomaly maps of a class's calibration images (normal images
training never saw, data/calibration.py):

  threshold  the conformal order statistic: the k-th smallest of the N calibration scores,
             k = ceil((N + 1)(1 - target_fpr)). If the calibration images and a new normal
             image are exchangeable (the same process, drawn alike), the chance that the new
             image scores at or above it is (N + 1 - k) / (N + 1) <= target_fpr, averaged over
             calibration sets (`expected_fpr`; exact for untied scores). The FPR of one
             particular calibration set is random: Beta(N + 1 - k, k); `fpr_upper_95` is its
             95% quantile (the FPR exceeds it for 5% of calibration sets). When k > N (fewer
             than 1 / target_fpr - 1 images) no threshold from these images can promise
             target_fpr: the threshold is the highest score, expected_fpr is 1 / (N + 1) and
             `meets_target` is False (`images_needed` says how many would do).
  center     their median image score.
  normalised score = (score - center) / (threshold - center): 0 = a typical normal
             image, 1 = the threshold; an image is anomalous where it is >= 1. The image
             score is a mean of map pixels, so the same affine map applied to a map gives
             a normalised map whose top-1% mean is the normalised score.
  heat range the fixed colour scale of the class's heatmaps: from the median pixel of
             the calibration maps (dark blue) to as far above the threshold (dark red),
             the threshold mid-scale; the same for every image of the class.

Without a calibration split the same statistics come from the test set (the F1-optimal
threshold and the normal test images' median): `source` says "test labels" then.
Saved as <workdir>/calibration.json, read by predict and export.
"""
import dataclasses
import json
import math

import numpy as np
from scipy import stats

from dinomaly_jax import storage

CALIBRATION_FILE = "calibration.json"
POOLED = "__all__"  # over all classes, for images of unknown class
FROM_CALIBRATION = "calibration images"
FROM_TEST_LABELS = "test labels (F1-optimal; no calibration split)"


@dataclasses.dataclass(frozen=True)
class ClassCalibration:
  threshold: float  # raw image score of the decision
  center: float  # raw image score that normalises to 0
  map_low: float  # raw map value at the bottom of the heatmap colour scale
  source: str  # FROM_CALIBRATION or FROM_TEST_LABELS
  num_images: int  # images the statistics come from
  target_fpr: float  # NaN when the threshold comes from test labels
  # The guarantee of a threshold from calibration images (NaN / 0 in files written before
  # the conformal rule, and for thresholds from test labels):
  rank: int = 0  # the threshold is the rank-th smallest calibration score (1-based)
  expected_fpr: float = float("nan")  # P(new normal image >= threshold) = (N + 1 - rank) / (N + 1)
  fpr_upper_95: float = float("nan")  # 95% upper confidence bound of this calibration set's FPR
  images_from: str = ""  # where the calibration images came from (data/calibration.describe)

  @property
  def meets_target(self) -> bool:
    return self.expected_fpr <= self.target_fpr * (1 + 1e-9)

  @property
  def scale(self) -> float:
    return max(self.threshold - self.center, 1e-12)

  def normalise(self, x):
    """Raw scores or maps -> normalised (0 = median normal image, 1 = threshold)."""
    return (np.asarray(x, np.float32) - np.float32(self.center)) / np.float32(self.scale)

  def heat_range(self) -> tuple[float, float]:
    """(vmin, vmax) of the class's heatmaps in raw map units; the threshold is mid-scale."""
    low = min(self.map_low, self.threshold - 1e-6)
    return low, 2 * self.threshold - low


def conformal_rank(n: int, target_fpr: float) -> int:
  """k = ceil((n + 1)(1 - target_fpr)), the rank of the threshold among n scores (may exceed n)."""
  return math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)


def images_needed(target_fpr: float) -> int:
  """The fewest calibration images whose conformal threshold promises target_fpr."""
  return math.ceil(1.0 / target_fpr - 1e-9) - 1


def fpr_guarantee(n: int, rank: int) -> tuple[float, float]:
  """(expected FPR, its 95% upper confidence bound) of the rank-th smallest of n scores."""
  misses = n + 1 - rank  # ranks of a new image above the threshold, among n + 1
  return misses / (n + 1), float(stats.beta.ppf(0.95, misses, rank))


def conformal_threshold(scores, target_fpr: float) -> tuple[float, int]:
  """(threshold, rank): the conformal order statistic of scores (N,), the highest when N is too few."""
  ordered = np.sort(np.asarray(scores, np.float64))
  rank = min(conformal_rank(ordered.size, target_fpr), ordered.size)
  return float(ordered[rank - 1]), rank


def calibrate(scores, maps, target_fpr: float, images_from: str = "") -> ClassCalibration:
  """Statistics of normal calibration images: scores (N,), maps (N, H, W)."""
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    raise ValueError("calibrate: no calibration images.")
  threshold, rank = conformal_threshold(scores, target_fpr)
  expected, upper = fpr_guarantee(scores.size, rank)
  return ClassCalibration(
      threshold=threshold, center=float(np.median(scores)),
      map_low=float(np.median(np.asarray(maps))), source=FROM_CALIBRATION,
      num_images=int(scores.size), target_fpr=float(target_fpr), rank=rank,
      expected_fpr=expected, fpr_upper_95=upper, images_from=images_from)


def guarantee_text(cal: ClassCalibration) -> str:
  """What the threshold promises, in words (one clause)."""
  if cal.source != FROM_CALIBRATION or math.isnan(cal.expected_fpr):
    return "no FPR guarantee (threshold not from the conformal rule on calibration images)"
  return (f"expected FPR {100 * cal.expected_fpr:.2g}% (target {100 * cal.target_fpr:.2g}%), "
          f"95% upper bound {100 * cal.fpr_upper_95:.2g}%, from {cal.num_images} normal images")


def shortfall_warning(name: str, cal: ClassCalibration) -> str | None:
  """One line when the class's calibration images are too few for its target, else None."""
  if cal.source != FROM_CALIBRATION or math.isnan(cal.expected_fpr) or cal.meets_target:
    return None
  return shortfall_line(name, cal.num_images, cal.target_fpr, cal.expected_fpr)


def shortfall_line(name: str, num_images: int, target_fpr: float, expected_fpr: float) -> str:
  return (f"WARNING: {name}: {num_images} calibration images cannot promise FPR "
          f"{100 * target_fpr:.2g}%; the threshold is their highest score (expected FPR "
          f"{100 * expected_fpr:.2g}%); {images_needed(target_fpr)} normal images would do.")


def from_test_labels(scores, labels, maps, f1_threshold: float) -> ClassCalibration:
  """The fallback without a calibration split: F1-optimal threshold, normal test statistics."""
  normal = np.asarray(labels) == 0
  scores, maps = np.asarray(scores, np.float64), np.asarray(maps)
  pick = normal if normal.any() else np.ones_like(normal)
  threshold = f1_threshold if np.isfinite(f1_threshold) else float(np.max(scores[pick]))
  return ClassCalibration(
      threshold=float(threshold), center=float(np.median(scores[pick])),
      map_low=float(np.median(maps[pick])), source=FROM_TEST_LABELS,
      num_images=int(pick.sum()), target_fpr=float("nan"))


def save(workdir: str, calibrations: dict[str, ClassCalibration]) -> str:
  """The primary process writes <workdir>/calibration.json atomically (local or gs:// / s3://); returns its path."""
  path = storage.join(workdir, CALIBRATION_FILE)
  storage.write_shared(path, json.dumps({name: _json_fields(c) for name, c in calibrations.items()}, indent=2))
  return path


def _json_fields(c: ClassCalibration) -> dict:
  fields = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in dataclasses.asdict(c).items()}
  if fields["expected_fpr"] is not None:  # for readers of the file; load recomputes it
    fields["meets_target"] = c.meets_target
  return fields


def load(workdir: str) -> dict[str, ClassCalibration]:
  """{class: ClassCalibration} from <workdir>/calibration.json (FileNotFoundError names it)."""
  path = storage.join(workdir, CALIBRATION_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"No {path}: run training (or --mode=eval) in {workdir} first.")
  raw = json.loads(storage.read_text(path))
  known = {f.name for f in dataclasses.fields(ClassCalibration)}  # older files lack the newer fields
  return {name: ClassCalibration(**{k: float("nan") if v is None else v for k, v in c.items() if k in known})
          for name, c in raw.items()}
