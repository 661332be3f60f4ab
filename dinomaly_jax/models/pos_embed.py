"""DINOv2 position-embedding interpolation, numerically matching PyTorch.

DINOv2 resizes its (G, G) patch position grid (G = 37 for img_size 518) with
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
antialias=False, scale_factor=((h + 0.1) / G, (w + 0.1) / G))`. Because a scale
factor is given, PyTorch maps output pixel `o` to the source coordinate
`(o + 0.5) / scale - 0.5` (not `(o + 0.5) * G / h - 0.5`), uses the Keys cubic
kernel with a = -0.75 and clamps source indices to the border. The output size
is `floor(G * scale) = h`. That resize is a fixed linear map per axis, built
here in numpy as an (out, in) matrix and applied with two contractions.

Note: Hugging Face `Dinov2Model` passes `size=(h, w)` instead (other source
coordinates) and `Dinov2WithRegistersModel` additionally uses antialias=True;
neither equals the official DINOv2 resize used by Dinomaly, which is this one.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (non-antialiased path).
DINOV2_INTERPOLATE_OFFSET = 0.1


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic weights for the 4 taps at offsets -1, 0, 1, 2; t in [0, 1)."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, scale: float) -> np.ndarray:
  """The (out, in) matrix of PyTorch's 1-D bicubic resize with `scale_factor`.

  Matches `interpolate(mode="bicubic", align_corners=False, antialias=False,
  scale_factor=scale)` along one axis; out = floor(in * scale).
  """
  out_size = math.floor(float(in_size) * scale)
  # PyTorch computes the source coordinate in float32 from 1 / scale.
  inv_scale = np.float32(1.0 / scale)
  dst = np.arange(out_size, dtype=np.float32)
  src = inv_scale * (dst + np.float32(0.5)) - np.float32(0.5)
  floor = np.floor(src)
  weights = _cubic_weights((src - floor).astype(np.float64))  # (out, 4)
  taps = floor.astype(np.int64)[:, None] + np.arange(-1, 3)  # (out, 4)
  taps = np.clip(taps, 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix.astype(np.float32)


def bicubic_resize(grid: jax.Array, scale_hw: tuple[float, float]) -> jax.Array:
  """Resizes a (H, W, D) grid like PyTorch bicubic with scale_factor=scale_hw."""
  rows = jnp.asarray(bicubic_matrix(grid.shape[0], scale_hw[0]))  # (h, H)
  cols = jnp.asarray(bicubic_matrix(grid.shape[1], scale_hw[1]))  # (w, W)
  return jnp.einsum("hH,wW,HWd->hwd", rows, cols, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int],
                          offset: float = DINOV2_INTERPOLATE_OFFSET) -> jax.Array:
  """DINOv2's `interpolate_pos_encoding`: (1, 1 + G*G, D) -> (1, 1 + h*w, D).

  The cls position embedding is kept; the patch grid is resized bicubically in
  float32 with the offset trick. Like DINOv2, a square input of the table's own
  grid size uses the table unchanged (the offset would otherwise shift it).
  """
  grid_in = math.isqrt(pos_embed.shape[1] - 1)
  if grid_in * grid_in != pos_embed.shape[1] - 1:
    raise ValueError(f"pos_embed has {pos_embed.shape[1] - 1} patch positions, not a square grid.")
  h, w = grid_hw
  if (h, w) == (grid_in, grid_in):
    return pos_embed.astype(jnp.float32)
  cls_pos = pos_embed[:, :1].astype(jnp.float32)  # (1, 1, D)
  patch_pos = pos_embed[0, 1:].reshape(grid_in, grid_in, -1)  # (G, G, D)
  scale = ((h + offset) / grid_in, (w + offset) / grid_in)
  resized = bicubic_resize(patch_pos, scale)  # (h, w, D)
  if resized.shape[:2] != (h, w):
    raise ValueError(f"Position grid {grid_in} with offset {offset} gives {resized.shape[:2]}, "
                     f"not the requested {(h, w)}.")
  return jnp.concatenate([cls_pos, resized.reshape(1, h * w, -1)], axis=1)
