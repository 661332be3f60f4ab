"""Loads an exported Dinomaly inference function. Needs jax and numpy only."""
import json
import os

import jax
import numpy as np


def load(export_dir: str):
  """Returns (fn, info): fn(images (b, S, S, 3) float32 normalised) -> (maps, scores)."""
  with open(os.path.join(export_dir, "inference.jax_export"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(export_dir, "params.npz")) as z:
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
  with open(os.path.join(export_dir, "export_info.json")) as f:
    info = json.load(f)

  def fn(images):
    return exported.call(leaves, np.asarray(images, np.float32))

  return fn, info
