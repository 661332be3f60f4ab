"""Group features -> anomaly map -> image score (pure, jittable).

Protocol: per group d = 1 - cos(encoder, decoder) over channels at h x w;
bilinear upsampling (align_corners=True) to the input size; mean over groups;
bilinear resize (align_corners=False, no antialiasing) to map_size; a
gaussian_size x gaussian_size Gaussian (normalised to sum 1, zero padding).
Everything after the cosine is linear and separable, so each group's chain is one
(map_size, h) matrix per axis, built in float64 with numpy at trace time and
applied with two exact float32 matmuls (no TF32). torch.nn.functional.interpolate
sampling rules are reproduced exactly (`jax.image.resize` differs: it antialiases).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dinomaly_jax.data import transforms

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity: each norm clamped to >= eps


def bilinear_weights(positions: np.ndarray, in_size: int) -> np.ndarray:
  """(out,) sample positions in input pixel units -> (out, in) bilinear weights, edges clamped."""
  pos = np.clip(np.asarray(positions, np.float64), 0, in_size - 1)
  lo = np.minimum(np.floor(pos).astype(np.int64), max(in_size - 2, 0))
  frac = pos - lo
  weights = np.zeros((pos.size, in_size))
  rows = np.arange(pos.size)
  np.add.at(weights, (rows, lo), 1 - frac)
  np.add.at(weights, (rows, np.minimum(lo + 1, in_size - 1)), frac)
  return weights


def resize_matrix(out_size: int, in_size: int, align_corners: bool) -> np.ndarray:
  """(out, in) matrix of torch's bilinear F.interpolate(size=out) along one axis.

  Source positions are computed in float32 as torch does for float32 tensors.
  """
  dst = np.arange(out_size, dtype=np.float32)
  if align_corners:
    scale = np.float32((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    pos = scale * dst
  else:
    scale = np.float32(in_size / out_size)
    pos = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  return bilinear_weights(pos, in_size)


def gaussian_matrix(size: int, kernel_size: int, sigma: float) -> np.ndarray:
  """(size, size) matrix of a normalised 1-d Gaussian with zero padding (kernel_size odd)."""
  offsets = np.arange(kernel_size) - (kernel_size - 1) / 2
  kernel = np.exp(-offsets**2 / (2 * sigma**2))
  kernel /= kernel.sum()  # its outer product is the reference's 2-d kernel normalised to 1
  matrix = np.zeros((size, size))
  for k, offset in zip(kernel, offsets.astype(int)):
    matrix += k * np.eye(size, k=offset)
  return matrix


def axis_matrix(feature_size: int, input_size: int, map_size: int, gaussian_size: int,
                gaussian_sigma: float) -> np.ndarray:
  """(map_size, feature_size): upsample (align_corners) -> resize -> Gaussian along one axis."""
  m = resize_matrix(map_size, input_size, False) @ resize_matrix(input_size, feature_size, True)
  if gaussian_size > 1:
    m = gaussian_matrix(map_size, gaussian_size, gaussian_sigma) @ m
  return m


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, h, w, D) x2 -> (B, h, w) float32: 1 - cos over channels."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norm_a = jnp.maximum(jnp.linalg.norm(a, axis=-1), COSINE_EPS)
  norm_b = jnp.maximum(jnp.linalg.norm(b, axis=-1), COSINE_EPS)
  return 1.0 - dot / (norm_a * norm_b)


def _check(enc_groups, dec_groups, map_size, gaussian_size, gaussian_sigma):
  if len(enc_groups) != len(dec_groups) or not enc_groups:
    raise ValueError(f"anomaly_map needs as many encoder as decoder groups (>= 1); got "
                     f"{len(enc_groups)} and {len(dec_groups)}.")
  for i, (e, d) in enumerate(zip(enc_groups, dec_groups)):
    if e.ndim != 4 or e.shape != d.shape:
      raise ValueError(f"Group {i}: expected encoder and decoder features of one shape "
                       f"(B, h, w, D); got {e.shape} and {d.shape}.")
  if map_size < 1 or gaussian_size < 1 or gaussian_size % 2 == 0 or gaussian_sigma <= 0:
    raise ValueError(f"eval.map_size must be >= 1, eval.gaussian_size odd >= 1 (1 = no blur) and "
                     f"eval.gaussian_sigma > 0; got {map_size}, {gaussian_size}, {gaussian_sigma}.")


def anomaly_map(enc_groups: Sequence[jax.Array], dec_groups: Sequence[jax.Array],
                input_hw: Sequence[int], *, map_size: int = 256, gaussian_size: int = 5,
                gaussian_sigma: float = 4.0) -> jax.Array:
  """Lists of (B, h, w, D) group features -> (B, map_size, map_size) float32 anomaly maps."""
  _check(enc_groups, dec_groups, map_size, gaussian_size, gaussian_sigma)
  total = 0.0
  for enc, dec in zip(enc_groups, dec_groups):
    rows = axis_matrix(enc.shape[1], input_hw[0], map_size, gaussian_size, gaussian_sigma)
    cols = axis_matrix(enc.shape[2], input_hw[1], map_size, gaussian_size, gaussian_sigma)
    total = total + jnp.einsum("sh,bhw,tw->bst", rows.astype(np.float32), cosine_distance(enc, dec),
                               cols.astype(np.float32), precision=jax.lax.Precision.HIGHEST)
  return total / len(enc_groups)


def top_k(map_size_hw: Sequence[int], top_ratio: float) -> int:
  """Pixels averaged into the image score: int(H * W * ratio) as the reference (655 at 256^2)."""
  k = int(map_size_hw[0] * map_size_hw[1] * top_ratio)
  if not 0 <= top_ratio <= 1 or (top_ratio > 0 and k < 1):
    raise ValueError(f"eval.top_ratio must be 0 (max) or in (0, 1] with at least one pixel; got "
                     f"{top_ratio} for a {tuple(map_size_hw)} map.")
  return k


def image_score(maps: jax.Array, top_ratio: float = 0.01) -> jax.Array:
  """(B, H, W) -> (B,): mean of the top int(H*W*top_ratio) pixels (top_ratio 0: the max)."""
  k = top_k(maps.shape[1:], top_ratio)
  flat = maps.reshape(maps.shape[0], -1)
  if k == 0:
    return jnp.max(flat, axis=1)
  return jnp.mean(jax.lax.top_k(flat, k)[0], axis=1)


def full_resolution_map(maps, original_hw: Sequence[int], data_config=None) -> np.ndarray:
  """(B, S, S) maps -> (B, H, W) float32 numpy maps in original image pixels.

  With `data_config` (fields `resize`, `crop`) the map is placed where the model saw
  the image: the centre crop of the image resized to resize x resize; pixels outside
  the crop were not seen and are 0. Without it the map spans the whole image.
  """
  maps = np.asarray(maps, np.float32)
  size = maps.shape[1:]
  mats = [_full_resolution_axis(out, s, data_config) for out, s in zip(original_hw, size)]
  # Two matrix products: (H, S) @ (B, S, S) @ (S, W). (A 3-operand np.einsum without
  # optimize loops over every (y, h, w, x): seconds per image.)
  return (mats[0] @ maps @ mats[1].T).astype(np.float32)


def _full_resolution_axis(out_size: int, map_size: int, data_config) -> np.ndarray:
  """(out_size, map_size) bilinear weights from one axis of the map to image pixels."""
  centers = np.arange(out_size) + 0.5
  if data_config is None:
    return bilinear_weights(centers * map_size / out_size - 0.5, map_size).astype(np.float32)
  resize, crop = data_config.resize, data_config.crop
  in_crop = centers * resize / out_size - transforms.crop_offset(resize, crop)  # crop pixel units
  weights = bilinear_weights(in_crop * map_size / crop - 0.5, map_size)
  weights[(in_crop < 0) | (in_crop > crop)] = 0
  return weights.astype(np.float32)
