"""Dinomaly's loose loss: global cosine distance with hard mining.

Each group contributes the batch mean of 1 - cos(a, b) over the flattened h*w*D
vector of each image (the encoder side `a` carries no gradient); groups are
averaged. Hard mining leaves this value alone and only scales the gradient that
reaches the decoder features: points whose per-point cosine distance is below the
k-th largest of the batch (k = int(B*h*w*(1-p))) get `easy_grad_factor`.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


def hard_mining_p(step, p_final: float, p_steps: int):
  """p = min(p_final * step / p_steps, p_final) (float32; works on traced steps)."""
  return jnp.minimum(p_final * jnp.asarray(step, jnp.float32) / p_steps, p_final)


def _normalise(x: jax.Array, axis) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, COSINE_EPS)


def point_cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, h, w, D) x2 -> (B, h, w): 1 - cos over channels."""
  return 1.0 - jnp.sum(_normalise(a, -1) * _normalise(b, -1), axis=-1)


def image_cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, h, w, D) x2 -> (B,): 1 - cos of the flattened maps."""
  a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  return 1.0 - jnp.sum(_normalise(a, -1) * _normalise(b, -1), axis=-1)


@jax.custom_vjp
def scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
  """Identity forward; backward multiplies the cotangent by `factor` (broadcast)."""
  return x


def _scale_gradient_fwd(x, factor):
  return x, factor


def _scale_gradient_bwd(factor, g):
  return g * factor, jnp.zeros_like(factor)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def num_hard_points(n: int, p):
  """k = int(n * (1 - p)), at least 1. A Python float p gives exactly the reference's
  (float64) value; a traced p is evaluated in float32 and can differ by one at an
  exact integer boundary (use `scheduled_num_hard_points` inside jit)."""
  if isinstance(p, (int, float)):
    return min(max(int(n * (1 - p)), 1), n)
  k = jnp.floor(n * (1.0 - jnp.asarray(p, jnp.float32))).astype(jnp.int32)
  return jnp.clip(k, 1, n)


def scheduled_num_hard_points(n: int, step, p_final: float, p_steps: int) -> jax.Array:
  """k at a (traced) step for p = min(p_final * step / p_steps, p_final), exactly as the
  reference computes it in float64: a table over steps 0..p_steps built on the host."""
  table = np.array([num_hard_points(n, min(p_final * s / p_steps, p_final))
                    for s in range(p_steps + 1)], np.int32)
  return jnp.asarray(table)[jnp.minimum(step, p_steps)]


def easy_point_factor(distance: jax.Array, num_hard, easy_grad_factor: float) -> jax.Array:
  """(B, h, w) distances -> (B, h, w) gradient factors: `easy_grad_factor` where the
  distance is below the `num_hard`-th largest of the whole batch, else 1."""
  thresh = jnp.sort(distance.reshape(-1))[distance.size - num_hard]  # the k-th largest
  return jnp.where(distance < thresh, easy_grad_factor, 1.0).astype(distance.dtype)


def global_cosine_loss(enc_groups: Sequence[jax.Array], dec_groups: Sequence[jax.Array]):
  """Plain global cosine loss (no hard mining); mean over groups of batch means."""
  _check_groups(enc_groups, dec_groups)
  losses = [jnp.mean(image_cosine_distance(jax.lax.stop_gradient(a), b))
            for a, b in zip(enc_groups, dec_groups)]
  return sum(losses) / len(losses)


def global_cosine_hm_loss(enc_groups: Sequence[jax.Array], dec_groups: Sequence[jax.Array],
                          p=None, easy_grad_factor: float = 0.1, *, num_hard=None):
  """The loose loss: global cosine loss whose gradient on easy points is scaled.

  Give the hard-mining ratio `p`, or directly `num_hard` (points per group that keep
  the full gradient, see `scheduled_num_hard_points`).
  """
  _check_groups(enc_groups, dec_groups)
  if (p is None) == (num_hard is None):
    raise ValueError("global_cosine_hm_loss takes exactly one of p and num_hard.")
  scaled = []
  for a, b in zip(enc_groups, dec_groups):
    distance = jax.lax.stop_gradient(point_cosine_distance(a, b))  # (B, h, w)
    k = num_hard_points(distance.size, p) if num_hard is None else num_hard
    factor = easy_point_factor(distance, k, easy_grad_factor)[..., None]  # (B, h, w, 1)
    scaled.append(scale_gradient(b, factor))
  return global_cosine_loss(enc_groups, scaled)


def _check_groups(enc_groups, dec_groups):
  if len(enc_groups) != len(dec_groups) or not enc_groups:
    raise ValueError(f"loss needs as many encoder as decoder groups (>= 1); got "
                     f"{len(enc_groups)} and {len(dec_groups)}.")
  for a, b in zip(enc_groups, dec_groups):
    if a.shape != b.shape or a.ndim != 4:
      raise ValueError(f"loss groups must be equal (B, h, w, D) maps; got {a.shape} and {b.shape}.")
