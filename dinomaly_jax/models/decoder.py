"""Noisy bottleneck and reconstruction decoder of Dinomaly, with ablation variants.

Attention kinds (`Decoder.attention`):
  linear       phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k)), phi = elu + 1 (default).
  qk_v_linear  the same in quadratic form: (phi(q) phi(k)^T) row-normalised, times v.
  softmax      softmax(q k^T / sqrt(d)) v.
Neighbour masking removes each patch's n x n neighbourhood from its attention
(softmax: the masked weights are zeroed after the softmax, as the reference does;
qk_v_linear: zeroed before the row normalisation). `conv_kernel > 0` replaces the
attention by a k x k inverted-bottleneck depthwise convolution over patch tokens.

Linear layers start from a truncated normal (std 0.01, cut at +-0.03) with zero
bias; LayerNorms from weight 1, bias 0 (the reference initialisation).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dinomaly_jax.models import activations
from dinomaly_jax.models import dense_grad
from dinomaly_jax.models import structure

ATTENTION_KINDS = structure.DECODER_ATTENTION_KINDS
LINEAR_KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.01, lower=-3.0, upper=3.0)
DECODER_LN_EPS = 1e-8


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=LINEAR_KERNEL_INIT,
                  bias_init=nn.initializers.zeros, dot_general=dense_grad.dense_dot_general,
                  name=name)


def elu_feature_map(x: jax.Array) -> jax.Array:
  return jax.nn.elu(x) + 1.0


def linear_attention(q, k, v, eps: float = 0.0):
  """q, k, v (B, H, N, d) -> (B, H, N, d); O(N d^2), no mask possible."""
  q, k = elu_feature_map(q), elu_feature_map(k)
  kv = jnp.einsum("bhnd,bhne->bhde", k, v)  # (B, H, d, d)
  normaliser = jnp.einsum("bhnd,bhd->bhn", q, k.sum(axis=2)) + eps  # (B, H, N)
  return jnp.einsum("bhnd,bhde->bhne", q, kv) / normaliser[..., None]


def qk_v_linear_attention(q, k, v, mask=None):
  """Quadratic form of linear attention; mask (N, N) bool, True = may attend."""
  weights = jnp.einsum("bhnd,bhmd->bhnm", elu_feature_map(q), elu_feature_map(k))  # (B, H, N, N)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  weights = weights / weights.sum(axis=-1, keepdims=True)
  return jnp.einsum("bhnm,bhmd->bhnd", weights, v)


def softmax_attention(q, k, v, mask=None):
  """Scaled dot-product attention; masked weights zeroed after the softmax."""
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5  # (B, H, N, N)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return jnp.einsum("bhnm,bhmd->bhnd", weights, v)


def neighbour_mask(grid_hw: Sequence[int], size: int, num_prefix: int) -> np.ndarray:
  """(N, N) bool, N = num_prefix + h*w; False where a patch key lies in the query's
  size x size neighbourhood (half-width size // 2). Prefix rows and columns stay True."""
  h, w = grid_hw
  rows, cols = np.divmod(np.arange(h * w), w)
  near = ((np.abs(rows[:, None] - rows[None, :]) <= size // 2)
          & (np.abs(cols[:, None] - cols[None, :]) <= size // 2))
  mask = np.ones((num_prefix + h * w,) * 2, dtype=bool)
  mask[num_prefix:, num_prefix:] = ~near
  return mask


class Attention(nn.Module):
  """Multi-head attention with a qkv projection (bias) and an output projection."""
  num_heads: int
  kind: str = "linear"
  linear_eps: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):  # x (B, N, D)
    b, n, d = x.shape
    qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    # Attention maths in float32: the linear kinds sum over all N tokens.
    q, k, v = jnp.transpose(qkv.astype(jnp.float32), (2, 0, 3, 1, 4))  # each (B, H, N, d)
    if self.kind == "linear":
      if mask is not None:
        raise ValueError("decoder_attention='linear' cannot take a neighbour mask; use "
                         "'qk_v_linear' or 'softmax' with mask_neighbor_size > 0.")
      out = linear_attention(q, k, v, self.linear_eps)
    elif self.kind == "qk_v_linear":
      out = qk_v_linear_attention(q, k, v, mask)
    elif self.kind == "softmax":
      out = softmax_attention(q, k, v, mask)
    else:
      raise ValueError(f"decoder_attention={self.kind!r}; expected one of {ATTENTION_KINDS}.")
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, d).astype(self.dtype)
    return _dense(d, "proj", self.dtype)(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, N, D)
    y = activations.gelu(_dense(self.hidden, "fc1", self.dtype)(x))
    return _dense(x.shape[-1], "fc2", self.dtype)(y)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=DECODER_LN_EPS, dtype=dtype, name=name)


class AttentionBlock(nn.Module):
  """Pre-norm transformer block: no LayerScale, no drop path, no dropout."""
  num_heads: int
  kind: str = "linear"
  linear_eps: float = 0.0
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):  # (B, N, D)
    attn = Attention(self.num_heads, self.kind, self.linear_eps, self.dtype, name="attn")
    x = x + attn(_layer_norm("norm1", self.dtype)(x), mask)
    mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")
    return x + mlp(_layer_norm("norm2", self.dtype)(x))


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class SepConv(nn.Module):
  """Inverted bottleneck: pointwise D -> 2D, GELU, k x k depthwise conv, pointwise 2D -> D."""
  kernel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid_hw):  # x (B, h*w, D) patch tokens only
    b, n, d = x.shape
    y = activations.gelu(_dense(2 * d, "pwconv1", self.dtype, use_bias=False)(x))
    bound = 1.0 / self.kernel  # torch Conv2d default init: U(+-1/sqrt(fan_in)), fan_in = k*k
    conv = nn.Conv(2 * d, (self.kernel, self.kernel), padding=self.kernel // 2,
                   feature_group_count=2 * d, use_bias=False, dtype=self.dtype,
                   kernel_init=_uniform(bound),
                   name="dwconv")
    y = conv(y.reshape(b, *grid_hw, 2 * d)).reshape(b, n, 2 * d)
    return _dense(d, "pwconv2", self.dtype, use_bias=False)(y)


class ConvBlock(nn.Module):
  """AttentionBlock with the attention replaced by SepConv (patch tokens only)."""
  kernel: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid_hw):  # (B, h*w, D)
    x = x + SepConv(self.kernel, self.dtype, name="conv")(_layer_norm("norm1", self.dtype)(x), grid_hw)
    mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")
    return x + mlp(_layer_norm("norm2", self.dtype)(x))


class NoisyBottleneck(nn.Module):
  """dropout -> fc1 (D -> ratio*D) -> GELU -> dropout -> fc2 -> dropout; no residual."""
  ratio: int = 4
  dropout: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):  # (B, N, D)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = drop(x.astype(self.dtype))
    x = drop(activations.gelu(_dense(self.ratio * x.shape[-1], "fc1", self.dtype)(x)))
    return drop(_dense(x.shape[-1] // self.ratio, "fc2", self.dtype)(x))


class TwoPartBottleneck(nn.Module):
  """Dinomaly2's bottleneck: down (D -> down_dim) -> dropout, then fc1 (down_dim -> ratio*D) ->
  GELU -> dropout -> fc2 (ratio*D -> D) -> dropout; no dropout on the input, no residual."""
  down_dim: int = 256
  ratio: int = 4
  dropout: float = 0.4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):  # (B, N, D)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    dim = x.shape[-1]
    x = drop(_dense(self.down_dim, "down", self.dtype)(x.astype(self.dtype)))  # (B, N, down_dim)
    x = drop(activations.gelu(_dense(self.ratio * dim, "fc1", self.dtype)(x)))  # (B, N, ratio*D)
    return drop(_dense(dim, "fc2", self.dtype)(x))  # (B, N, D)


def make_bottleneck(ratio: int, dropout: float, down_dim: int, dtype: Any) -> nn.Module:
  """Dinomaly's noisy MLP (down_dim 0) or Dinomaly2's two-part bottleneck (down_dim > 0)."""
  if down_dim > 0:
    return TwoPartBottleneck(down_dim, ratio, dropout, dtype)
  return NoisyBottleneck(ratio, dropout, dtype)


class Decoder(nn.Module):
  """`depth` blocks; returns every block's output (B, N, D), first block first."""
  depth: int = 8
  num_heads: int = 12
  attention: str = "linear"
  linear_eps: float = 0.0
  mask_neighbor_size: int = 0
  conv_kernel: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid_hw: Sequence[int]):  # x (B, N, D); conv: patch tokens only
    if self.conv_kernel > 0:
      blocks = [ConvBlock(self.conv_kernel, dtype=self.dtype, name=f"blocks_{i}")
                for i in range(self.depth)]
      return _run_blocks(blocks, x, grid_hw)
    mask = None
    if self.mask_neighbor_size > 0:
      num_prefix = x.shape[1] - grid_hw[0] * grid_hw[1]
      mask = jnp.asarray(neighbour_mask(grid_hw, self.mask_neighbor_size, num_prefix))
    blocks = [AttentionBlock(self.num_heads, self.attention, self.linear_eps, dtype=self.dtype,
                             name=f"blocks_{i}") for i in range(self.depth)]
    return _run_blocks(blocks, x, mask)


def _run_blocks(blocks, x, extra):
  outputs = []
  for block in blocks:
    x = block(x, extra)
    outputs.append(x)
  return outputs
