"""Loads an exported Dinomaly inference function. Needs jax, numpy and etils only
(etils.epath reads local paths and, with gcsfs / s3fs, gs:// and s3:// URLs)."""
import io
import json

from etils import epath
import jax
import numpy as np


def load(export_dir: str):
  """Returns (fn, info): fn(images, classes=None) -> dict of numpy outputs.

  images: (b, S, S, 3) float32, ImageNet-normalised. classes: None (the pooled
  calibration), a class name for all images, or one name per image. Outputs: maps,
  scores, normalised_maps, normalised_scores (0 = median normal image, 1 = the class's
  calibrated threshold), anomalous (score >= threshold).
  """
  export_dir = epath.Path(export_dir)
  exported = jax.export.deserialize(bytearray((export_dir / "inference.jax_export").read_bytes()))
  with np.load(io.BytesIO((export_dir / "params.npz").read_bytes())) as z:
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
  info = json.loads((export_dir / "export_info.json").read_text())

  def fn(images, classes=None):
    images = np.asarray(images, np.float32)
    if classes is None or isinstance(classes, str):
      classes = [classes] * images.shape[0]
    classes = [c or info["pooled_class"] for c in classes]
    unknown = sorted(set(classes) - set(info["classes"]))
    if unknown:
      raise ValueError(f"unknown classes {unknown}; the export knows {info['classes']}.")
    ids = np.array([info["classes"].index(c) for c in classes], np.int32)
    return {k: np.asarray(v) for k, v in exported.call(leaves, images, ids).items()}

  return fn, info
