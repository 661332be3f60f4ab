"""DINOv3's axial rotary position embedding (RoPE) at inference.

Each patch centre gets (y, x) coordinates in [-1, 1], normalised separately per
axis: c = 2 * (i + 0.5) / n - 1 for patch i of n along that axis. A head of size
d uses d/4 periods p_k = base ** (4k / d); the angles 2*pi*c/p_k of y then of x
fill d/2 slots, repeated twice to d. Queries and keys of the patch tokens are
rotated by the usual "rotate half" rule, x * cos + [-x2, x1] * sin; the cls and
register tokens are not rotated. DINOv3's coordinate augmentations (shift,
jitter, rescale) act only in training and are not part of this (frozen) encoder.
"""
import jax.numpy as jnp
import numpy as np


def rope_periods(head_dim: int, base: float) -> np.ndarray:
  """(head_dim // 4,) periods base ** (4k / head_dim), as the official `rope_embed.periods`."""
  if head_dim % 4:
    raise ValueError(f"RoPE needs a head size divisible by 4, got {head_dim}.")
  return base ** (4.0 * np.arange(head_dim // 4) / head_dim)


def patch_centers(grid_hw: tuple[int, int]) -> np.ndarray:
  """(h*w, 2) row-major (y, x) patch-centre coordinates in [-1, 1]."""
  h, w = grid_hw
  ys = 2.0 * (np.arange(h) + 0.5) / h - 1.0
  xs = 2.0 * (np.arange(w) + 0.5) / w - 1.0
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)


def rope_tables(grid_hw: tuple[int, int], head_dim: int, base: float):
  """(cos, sin), each (h*w, head_dim) float32, for a patch grid of grid_hw."""
  angles = 2 * np.pi * patch_centers(grid_hw)[:, :, None] / rope_periods(head_dim, base)  # (P, 2, d/4)
  angles = np.tile(angles.reshape(angles.shape[0], head_dim // 2), 2)  # (P, d)
  return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def rotate_patches(x, cos, sin):
  """x: (B, N, heads, head_dim); rotates the last P = cos.shape[0] tokens, in float32."""
  patches = cos.shape[0]
  prefix, tail = x[:, :x.shape[1] - patches], x[:, x.shape[1] - patches:].astype(jnp.float32)
  first, second = jnp.split(tail, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  tail = tail * cos[:, None, :] + rotated * sin[:, None, :]  # tables broadcast over heads
  return jnp.concatenate([prefix, tail.astype(x.dtype)], axis=1)
