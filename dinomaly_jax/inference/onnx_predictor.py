r"""Prediction with an ONNX export and ONNX Runtime alone: no JAX, no other module of this package.

  pip install onnxruntime numpy pillow
  python onnx_predictor.py --export runs/demo/export --input '/data/new/*.png' --output predictions
      [--class-name nut] [--batch-size 8] [--threads 0] [--save-maps]

Reads <export>/model.onnx and export_info.json (written by `--mode=export
--config.export.format=onnx`), and does what `--mode=predict` does: each image is decoded,
resized to resize x resize (PIL bilinear), centre-cropped and ImageNet-normalised; the model
gives the map, the image score and the normalised score; the map is placed back on the
original image (the centre crop the model saw; the unseen border is 0) and drawn on the
class's fixed colour scale with the threshold outlined; predictions.csv has the columns of
--mode=predict. Local files only. This file may be copied alone next to the export.
"""
import argparse
import csv
import glob
import json
import os
import struct
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CSV_COLUMNS = ("image", "class", "class_from", "score", "normalised_score", "threshold", "threshold_from",
               "decision", "heatmap", "error")
# matplotlib's "jet" colour map, as (x, value) points per channel; 256 colours.
JET = (((0.0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1.0, 0.5)),
       ((0.0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1.0, 0)),
       ((0.0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1.0, 0)))
COLOURS = 256


class InputError(ValueError):
  """Bad input: printed as one line naming the file or option."""


class Predictor:
  """An ONNX export in ONNX Runtime: images (uint8 RGB, any size) -> maps, scores, decisions."""

  def __init__(self, export_dir: str, threads: int = 0):
    info_path, model_path = os.path.join(export_dir, "export_info.json"), os.path.join(export_dir, "model.onnx")
    for path in (info_path, model_path):
      if not os.path.isfile(path):
        raise InputError(f"{path}: not found; expected an export written with --mode=export "
                         "--config.export.format=onnx.")
    with open(info_path) as f:
      self.info = json.load(f)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
    self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    self.mean = np.asarray(self.info["mean"], np.float32)
    self.std = np.asarray(self.info["std"], np.float32)

  def preprocess(self, rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (crop, crop, 3): resize, centre crop, /255, ImageNet mean/std."""
    resize, crop = self.info["resize"], self.info["input_size"]
    resized = np.asarray(Image.fromarray(rgb).resize((resize, resize), Image.BILINEAR))
    top = crop_offset(resize, crop)
    x = resized[top:top + crop, top:top + crop].astype(np.float32) / np.float32(255)
    return (x - self.mean) / self.std

  def run(self, images: np.ndarray, classes: list[str]) -> dict:
    """images (b, crop, crop, 3) float32, a calibrated class per image -> the model's outputs."""
    ids = np.array([self.info["classes"].index(c) for c in classes], np.int32)
    names = [o.name for o in self.session.get_outputs()]
    return dict(zip(names, self.session.run(None, {"images": images, "class_ids": ids})))

  def class_of(self, path: str, class_name: str = "") -> str:
    """The configured class, else a calibrated class named in the path's folders, else pooled."""
    pooled, known = self.info["pooled_class"], self.info["classes"]
    if class_name:
      if class_name not in known:
        raise InputError(f"--class-name={class_name!r} is not a trained class; known: "
                         f"{sorted(c for c in known if c != pooled)}.")
      return class_name
    for part in reversed(os.path.normpath(path).split(os.sep)[:-1]):
      if part in known and part != pooled:
        return part
    return pooled

  def full_resolution(self, amap: np.ndarray, original_hw) -> np.ndarray:
    """(S, S) map -> (H, W) float32 on the original image; pixels outside the crop are 0."""
    rows, cols = (_axis_taps(out, amap.shape[i], self.info["resize"], self.info["input_size"])
                  for i, out in enumerate(original_hw))
    along_rows = _resize_last_axis(amap.T, rows)  # (w, H)
    return _resize_last_axis(along_rows.T, cols).astype(np.float32)  # (H, W)


def crop_offset(size: int, crop: int) -> int:
  """torchvision CenterCrop's top/left offset."""
  return int(round((size - crop) / 2.0))


def _significant_bits(img, path: str) -> int:
  """The bits a 16-bit image uses, as --mode=predict reads them: PNG sBIT, TIFF MaxSampleValue, else 16."""
  if img.format == "PNG":
    with open(path, "rb") as f:
      data, pos = f.read(1 << 16), 8
    while pos + 8 <= len(data):
      length, kind = struct.unpack(">I4s", data[pos:pos + 8])
      if kind == b"sBIT" and length >= 1:
        return data[pos + 8] if 1 <= data[pos + 8] <= 16 else 16
      if kind in (b"IDAT", b"IEND"):
        break
      pos += 12 + length
    return 16
  if img.format == "TIFF":
    max_value = img.tag_v2.get(281)  # MaxSampleValue
    if isinstance(max_value, tuple):
      max_value = max(max_value)
    if max_value:
      return max(1, min(16, int(max_value).bit_length()))
  return 16


def load_rgb(path: str, bit_depth: int = 0) -> np.ndarray:
  """Image file -> RGB uint8 (H, W, 3); 16-bit grayscale scaled by its real bit depth (bit_depth,
  else the file's), 255 = 2^bits - 1, rounded, as --mode=predict does."""
  try:
    with Image.open(path) as img:
      if img.mode in SIXTEEN_BIT_MODES:
        top = float((1 << (bit_depth or _significant_bits(img, path))) - 1)
        gray = np.round(np.clip(np.asarray(img, np.int64), 0, top) * (255.0 / top)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
      if img.mode == "F":
        raise InputError(f"{path}: floating-point images are not supported; expected an 8- or 16-bit image.")
      return np.asarray(img.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: cannot be read as an image ({e}).") from None


def list_images(pattern: str) -> list[str]:
  """A folder (searched recursively) or a glob pattern -> sorted image paths."""
  if os.path.isdir(pattern):
    paths = [os.path.join(d, f) for d, _, files in os.walk(pattern) for f in files]
  else:
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  paths = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise InputError(f"--input: no images ({', '.join(IMAGE_EXTENSIONS)}) match {pattern!r}.")
  return paths


def _axis_taps(out_size: int, map_size: int, resize: int, crop: int):
  """Bilinear taps from one map axis to image pixels: (out_size,) lower and upper map indices
  and their float32 weights; both weights are 0 for pixels outside the crop the model saw."""
  in_crop = (np.arange(out_size) + 0.5) * resize / out_size - crop_offset(resize, crop)  # crop pixels
  pos = np.clip(in_crop * map_size / crop - 0.5, 0, map_size - 1)
  lower = np.minimum(np.floor(pos).astype(np.int64), max(map_size - 2, 0))
  frac = pos - lower
  seen = (in_crop >= 0) & (in_crop <= crop)
  return (lower, np.minimum(lower + 1, map_size - 1), np.where(seen, 1 - frac, 0).astype(np.float32),
          np.where(seen, frac, 0).astype(np.float32))


def _resize_last_axis(x: np.ndarray, taps) -> np.ndarray:
  """x (..., map_size) -> (..., out_size) with the taps of _axis_taps."""
  lower, upper, w_lower, w_upper = taps
  return x[..., lower] * w_lower + x[..., upper] * w_upper


def _jet_table() -> np.ndarray:
  """(256, 3) float64 colours, as matplotlib builds its lookup table."""
  table = np.zeros((COLOURS, 3))
  positions = (COLOURS - 1) * np.linspace(0, 1, COLOURS)
  for channel, points in enumerate(JET):
    x = np.array([p[0] for p in points]) * (COLOURS - 1)
    y = np.array([p[1] for p in points], np.float64)
    ind = np.searchsorted(x, positions)[1:-1]
    distance = (positions[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    table[:, channel] = np.clip(np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]]), 0, 1)
  return table


def _erode(mask: np.ndarray) -> np.ndarray:
  """One binary erosion with the 4-neighbour cross; outside the image counts as background."""
  p = np.pad(mask, 1, constant_values=False)
  return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def heatmap(original: np.ndarray, full_map: np.ndarray, threshold: float, heat_range) -> np.ndarray:
  """image | overlay (half image, half jet on the class's fixed scale), map >= threshold outlined in white."""
  vmin, vmax = heat_range
  x = np.clip((full_map - vmin) / (vmax - vmin), 0, 1) * COLOURS
  x[x == COLOURS] = COLOURS - 1
  heat = _jet_table()[x.astype(int)]
  painted = np.round(0.5 * original.astype(np.float64) + 127.5 * heat).astype(np.uint8)
  if np.isfinite(threshold):
    region = full_map >= threshold
    painted[region & ~_erode(_erode(region))] = 255
  return np.concatenate([original, painted], axis=1)


def predict(predictor: Predictor, paths: list[str], out_dir: str, class_name: str = "",
            batch_size: int = 8, save_maps: bool = False) -> list[dict]:
  """Scores `paths`, writes a heatmap PNG per image (and map .npy) and predictions.csv; the rows."""
  common = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
  rows = []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    originals = [load_rgb(p, int(predictor.info.get("bit_depth", 0))) for p in chunk]
    classes = [predictor.class_of(p, class_name) for p in chunk]
    out = predictor.run(np.stack([predictor.preprocess(o) for o in originals]), classes)
    for i, (path, original, name) in enumerate(zip(chunk, originals, classes)):
      cal = predictor.info["calibration"][name]
      stem = os.path.join(out_dir, os.path.splitext(os.path.relpath(path, common))[0])
      os.makedirs(os.path.dirname(stem), exist_ok=True)
      full = predictor.full_resolution(out["maps"][i], original.shape[:2])
      Image.fromarray(heatmap(original, full, cal["threshold"], cal["heat_range"])).save(
          stem + "_heatmap.png", format="png", compress_level=1)
      if save_maps:
        np.save(stem + "_map.npy", full)
      score = float(out["scores"][i])
      how = "flag" if class_name else ("pooled" if name == predictor.info["pooled_class"] else "path")
      rows.append({"image": path, "class": name, "class_from": how, "score": score,
                   "normalised_score": float(out["normalised_scores"][i]), "threshold": cal["threshold"],
                   "threshold_from": cal["source"],
                   "decision": "anomalous" if score >= cal["threshold"] else "normal",
                   "heatmap": stem + "_heatmap.png", "error": ""})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--export", required=True, help="the export folder (model.onnx, export_info.json)")
  parser.add_argument("--input", required=True, help="a folder (recursive) or a glob of images")
  parser.add_argument("--output", required=True, help="folder for predictions.csv and the heatmaps")
  parser.add_argument("--class-name", default="", help="threshold of this class (default: from the path)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
  parser.add_argument("--save-maps", action="store_true", help="also <stem>_map.npy (float32)")
  args = parser.parse_args(argv)
  try:
    if args.batch_size < 1:
      raise InputError(f"--batch-size must be >= 1; got {args.batch_size}.")
    predictor = Predictor(args.export, args.threads)
    rows = predict(predictor, list_images(args.input), args.output, args.class_name, args.batch_size,
                   args.save_maps)
  except InputError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  n_bad = sum(r["decision"] == "anomalous" for r in rows)
  print(f"{len(rows)} images: {n_bad} anomalous, {len(rows) - n_bad} normal -> "
        f"{os.path.join(args.output, 'predictions.csv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
