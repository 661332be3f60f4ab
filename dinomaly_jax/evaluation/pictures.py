"""Pictures of an evaluation: strips per test image, score plots per class, prediction heatmaps.

Matplotlib without pyplot (Figure + Agg canvas): no global state, no display needed.
Heatmaps of a class share one fixed colour scale, `scale` = (vmin, vmax) from the class's
calibration (calibration.ClassCalibration.heat_range: the median normal pixel is blue,
the threshold mid-colormap), never a per-image min-max, so a normal image looks normal
and two images of a class compare by eye. The thresholded mask is map >= threshold.
Without a scale: 0 .. 2 x threshold, or min..max of the maps without a finite threshold.
"""
import os
import re

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from sklearn import metrics as skm

from dinomaly_jax import storage

CMAP = colormaps["jet"]


def _color_range(maps: np.ndarray, threshold: float, scale=None) -> tuple[float, float]:
  if scale is not None:
    return float(scale[0]), float(scale[1])
  if np.isfinite(threshold) and threshold > 0:
    return 0.0, 2.0 * float(threshold)
  lo, hi = float(np.min(maps)), float(np.max(maps))
  return lo, max(hi, lo + 1e-12)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """(H, W, 3) uint8 image, (H, W) map -> (H, W, 3) uint8: half image, half jet heatmap."""
  # CMAP(x) picks colour int(x * N) (N - 1 at 1): the same lookup in float32, without the
  # float64 RGBA array matplotlib builds (384 MB for a 4000x3000 map).
  lut = np.asarray(CMAP(np.arange(CMAP.N))[:, :3], np.float32)  # (N, 3)
  scaled = np.clip((np.asarray(amap, np.float32) - np.float32(vmin)) / np.float32(vmax - vmin), 0, 1)
  heat = lut[np.minimum((scaled * CMAP.N).astype(np.int32), CMAP.N - 1)]  # (H, W, 3)
  return np.round(np.float32(0.5) * image + np.float32(127.5) * heat).astype(np.uint8)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  storage.write_shared_with(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def save_strips(out_dir: str, class_name: str, images_uint8, masks, maps, threshold: float,
                names, scale=None) -> list[str]:
  """One PNG per image: image | ground truth | heatmap overlay | thresholded map. Returns paths.

  scale: (vmin, vmax) of the heatmap colours (see the module docstring).
  """
  images_uint8, masks, maps = np.asarray(images_uint8), np.asarray(masks), np.asarray(maps)
  if not len(images_uint8) == len(masks) == len(maps) == len(names):
    raise ValueError(f"save_strips: {len(images_uint8)} images, {len(masks)} masks, {len(maps)} maps "
                     f"and {len(names)} names; expected one of each per picture.")
  vmin, vmax = _color_range(maps, threshold, scale)
  paths = []
  for i, (image, mask, amap, name) in enumerate(zip(images_uint8, masks, maps, names)):
    if image.shape[:2] != amap.shape:
      raise ValueError(f"save_strips: image {name!r} is {image.shape[:2]} but its map is {amap.shape}.")
    fig = Figure(figsize=(12, 3.4))
    panels = [(image, "image"), (mask > 0, "ground truth"), (overlay(image, amap, vmin, vmax),
              f"map (max {amap.max():.3f})"), (amap >= threshold, f"map >= {threshold:.3f}")]
    for j, (picture, title) in enumerate(panels):
      ax = fig.add_subplot(1, 4, j + 1)
      if picture.ndim == 2:
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
      else:
        ax.imshow(picture)
      ax.set_title(title, fontsize=9)
      ax.axis("off")
    fig.suptitle(f"{class_name}: {name}", fontsize=9, parse_math=False)  # "$" in a name is text
    fig.tight_layout()
    path = storage.join(out_dir, class_name, f"{i:02d}_{_safe(os.path.splitext(name)[0])}.png")
    _save(fig, path)
    paths.append(path)
  return paths


def score_figure(class_name: str, scores, labels, thresholds=None) -> Figure:
  """Histogram of normal vs anomalous image scores (thresholds drawn), ROC and PR curves.

  thresholds: {label: score} drawn as vertical lines on the histogram.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
  fig = Figure(figsize=(13, 3.8))
  ax = fig.add_subplot(1, 3, 1)
  bins = np.histogram_bin_edges(scores, bins=30)
  ax.hist(scores[~labels], bins=bins, alpha=0.6, label=f"normal ({(~labels).sum()})", color="tab:blue")
  ax.hist(scores[labels], bins=bins, alpha=0.6, label=f"anomalous ({labels.sum()})", color="tab:red")
  for (label, value), style in zip((thresholds or {}).items(), ("-", "--", ":")):
    if np.isfinite(value):
      ax.axvline(value, color="black", linestyle=style, linewidth=1.2, label=label)
  ax.set_xlabel("image score")
  ax.set_ylim(0, ax.get_ylim()[1] * 1.5)  # room for the legend above the bars
  ax.legend(fontsize=7, loc="upper right")
  ax.set_title("score histogram", fontsize=9)
  if labels.any() and not labels.all():
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    curves = [(fpr, tpr, "false positive rate", "true positive rate",
               f"ROC (AUROC {skm.roc_auc_score(labels, scores):.4f})"),
              (recall, precision, "recall", "precision",
               f"PR (AP {skm.average_precision_score(labels, scores):.4f})")]
    for j, (x, y, xlabel, ylabel, title) in enumerate(curves):
      ax = fig.add_subplot(1, 3, j + 2)
      ax.plot(x, y, drawstyle="steps-post" if j else "default")
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.set_xlim(0, 1)
      ax.set_ylim(0, 1.02)
      ax.set_title(title, fontsize=9)
  fig.suptitle(class_name, fontsize=10, parse_math=False)
  fig.tight_layout()
  return fig


def save_score_plots(out_dir: str, class_name: str, scores, labels, thresholds=None) -> str:
  """One PNG per class: the score_figure."""
  path = storage.join(out_dir, class_name, "scores.png")
  _save(score_figure(class_name, scores, labels, thresholds), path)
  return path


def outline(picture: np.ndarray, region: np.ndarray, colour) -> np.ndarray:
  """A copy of `picture` (H, W, 3) with the 2-pixel edge of `region` (H, W) bool painted `colour`."""
  edge = region & ~ndimage.binary_erosion(region, iterations=2)
  out = picture.copy()
  out[edge] = colour
  return out


def save_heatmap(path: str, original_uint8, full_map, threshold: float, scale=None) -> None:
  """One PNG at the original resolution: image | overlay with the map >= threshold outlined.

  scale: (vmin, vmax) of the heatmap colours (see the module docstring).
  """
  image, amap = np.asarray(original_uint8), np.asarray(full_map, np.float32)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] != amap.shape:
    raise ValueError(f"save_heatmap: image {image.shape[:2]} and map {amap.shape} differ in size.")
  vmin, vmax = _color_range(amap, threshold, scale)
  painted = overlay(image[..., :3], amap, vmin, vmax)
  if np.isfinite(threshold):
    painted = outline(painted, amap >= threshold, 255)  # white
  # Fast zlib level: a predicted folder writes one such PNG per image.
  picture = Image.fromarray(np.concatenate([image[..., :3], painted], axis=1))
  storage.write_shared_with(path, lambda f: picture.save(f, format="png", compress_level=1))
