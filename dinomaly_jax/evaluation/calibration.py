"""Decision thresholds and score normalisation per class, from normal images only.

From the image scores and anomaly maps of a class's calibration images (normal images
training never saw, data/calibration.py):

  threshold  the (1 - target_fpr) quantile of their image scores (linear interpolation):
             about target_fpr of normal images score at or above it. With fewer than
             1 / target_fpr images it lies between the two highest scores.
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

import numpy as np

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


def calibrate(scores, maps, target_fpr: float) -> ClassCalibration:
  """Statistics of normal calibration images: scores (N,), maps (N, H, W)."""
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    raise ValueError("calibrate: no calibration images.")
  return ClassCalibration(
      threshold=float(np.quantile(scores, 1.0 - target_fpr)), center=float(np.median(scores)),
      map_low=float(np.median(np.asarray(maps))), source=FROM_CALIBRATION,
      num_images=int(scores.size), target_fpr=float(target_fpr))


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
  storage.write_shared(path, json.dumps({name: {k: (None if isinstance(v, float) and np.isnan(v) else v)
                                              for k, v in dataclasses.asdict(c).items()}
                                       for name, c in calibrations.items()}, indent=2))
  return path


def load(workdir: str) -> dict[str, ClassCalibration]:
  """{class: ClassCalibration} from <workdir>/calibration.json (FileNotFoundError names it)."""
  path = storage.join(workdir, CALIBRATION_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"No {path}: run training (or --mode=eval) in {workdir} first.")
  raw = json.loads(storage.read_text(path))
  return {name: ClassCalibration(**{k: float("nan") if v is None else v for k, v in c.items()})
          for name, c in raw.items()}
