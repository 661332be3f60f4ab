"""DINOv2 ViT/14 encoder in Flax linen, returning raw outputs of chosen blocks.

Parameter names follow the official DINOv2 module names (`patch_embed`,
`blocks_{i}/attn/qkv`, `ls1/gamma`, ...), so conversion is a key rename plus
transposes (see `weights/dinov2_keys.py`). The final `norm` and the
`mask_token` of the official model are not part of this tree: Dinomaly uses raw
block outputs and no masking.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dinomaly_jax.models import activations
from dinomaly_jax.models import attention
from dinomaly_jax.models import pos_embed as pos_embed_lib
from dinomaly_jax.models import rope as rope_lib

VIT_VARIANTS = {
    "small": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
  """DINOv2's SwiGLU hidden size: 2/3 of the MLP size, rounded up to a multiple of 8."""
  return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
  """Per-channel scale `gamma` (DINOv2 `ls1`/`ls2`)."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(1e-5), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class FeedForward(nn.Module):
  """The block MLP (DINOv2, DINOv3). kind "mlp": fc1 -> exact GELU -> fc2;
  kind "swiglu": w12 -> silu(x1) * x2 -> w3 (DINOv2 `SwiGLUFFNFused`)."""
  hidden_dim: int
  kind: str
  dtype: Any

  @nn.compact
  def __call__(self, x):  # (B, N, D) -> (B, N, D)
    if self.kind == "swiglu":
      x1, x2 = jnp.split(nn.Dense(2 * self.hidden_dim, dtype=self.dtype, name="w12")(x), 2, axis=-1)
      hidden, out_name = nn.silu(x1) * x2, "w3"
    else:
      hidden = activations.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x))
      out_name = "fc2"
    return nn.Dense(x.shape[-1], dtype=self.dtype, name=out_name)(hidden)


class Attention(nn.Module):
  """Multi-head softmax self-attention with a fused qkv projection.

  `rope` (DINOv3): (cos, sin) tables of shape (P, head_dim) rotating the queries
  and keys of the last P tokens (the patches; prefix tokens are not rotated).
  """
  num_heads: int
  dtype: Any
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope=None):  # (B, N, D)
    batch, tokens, dim = x.shape
    qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
    if rope is not None:
      q, k = rope_lib.rotate_patches(q, *rope), rope_lib.rotate_patches(k, *rope)
    out = attention.dot_product_attention(q, k, v, self.attention_impl)
    return nn.Dense(dim, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, dim))


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on both residual branches."""
  num_heads: int
  ffn: str
  ffn_hidden_dim: int
  ln_eps: float
  dtype: Any
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope=None):  # (B, N, D); rope: see Attention
    norm = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(norm("norm1")(x), rope)
    x = x + LayerScale(name="ls1")(y)
    y = FeedForward(self.ffn_hidden_dim, self.ffn, self.dtype, name="mlp")(norm("norm2")(x))
    return x + LayerScale(name="ls2")(y)


class DinoV2Encoder(nn.Module):
  """DINOv2 ViT with optional register tokens; returns raw block outputs."""
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = "mlp"  # or "swiglu"
  num_registers: int = 0
  patch_size: int = 14
  pos_grid: int = 37
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, layers: Sequence[int]):
    """images: (B, H, W, 3) normalised, H and W multiples of the patch size.

    Returns one (B, 1 + R + h*w, D) float32 array per entry of `layers`
    (0-based block indices); blocks after max(layers) are not computed (at
    init every block runs, so the parameter tree is always complete).
    """
    check_inputs(images, layers, self.patch_size, self.depth, self.ffn)
    x, grid_hw = embed_patches(images, self.patch_size, self.embed_dim, self.dtype)
    batch, dim = x.shape[0], self.embed_dim
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim))
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                           (1, self.pos_grid**2 + 1, dim))
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, dim)), x], 1)
    x = x + pos_embed_lib.interpolate_pos_embed(pos_embed, grid_hw).astype(self.dtype)
    if self.num_registers:
      registers = self.param("register_tokens", nn.initializers.normal(1e-6),
                             (1, self.num_registers, dim))
      registers = jnp.broadcast_to(registers.astype(self.dtype), (batch, self.num_registers, dim))
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)  # [cls, registers, patches]

    ffn_hidden_dim = (swiglu_hidden_dim(dim, self.mlp_ratio) if self.ffn == "swiglu"
                      else int(dim * self.mlp_ratio))
    block = lambda i: Block(self.num_heads, self.ffn, ffn_hidden_dim, self.ln_eps, self.dtype,
                            self.attention_impl, name=f"blocks_{i}")
    return run_blocks(x, layers, self.depth, block, self.is_initializing())


def run_blocks(x, layers: Sequence[int], depth: int, block, initializing: bool, rope=None):
  """Runs `block(i)` for i = 0.. max(layers) (all `depth` blocks at init, so the
  parameter tree is complete); returns the (B, N, D) float32 outputs of `layers`."""
  last = depth - 1 if initializing else max(layers)
  outputs = {}
  for i in range(last + 1):
    x = block(i)(x, rope)
    outputs[i] = x
  return [outputs[i].astype(jnp.float32) for i in layers]


def embed_patches(images, patch_size: int, dim: int, dtype):
  """The `patch_embed` conv of the calling encoder: (B, H, W, 3) -> ((B, h*w, D), (h, w))."""
  batch, height, width, _ = images.shape
  x = nn.Conv(dim, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID", dtype=dtype,
              name="patch_embed")(images.astype(dtype))
  return x.reshape(batch, -1, dim), (height // patch_size, width // patch_size)  # torch flatten(2) order


def check_inputs(images, layers: Sequence[int], patch_size: int, depth: int, ffn: str) -> None:
  """Raises a ValueError for images that are not (B, H, W, 3) patch multiples, bad layers
  or an unknown feed-forward kind."""
  if ffn not in ("mlp", "swiglu"):
    raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}.")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3) NHWC, got shape {images.shape}.")
  if images.shape[1] % patch_size or images.shape[2] % patch_size:
    raise ValueError(f"Image height and width must be multiples of {patch_size}, "
                     f"got {images.shape[1]}x{images.shape[2]}.")
  if not layers or any(not 0 <= i < depth for i in layers):
    raise ValueError(f"layers must be non-empty block indices in [0, {depth}), got {list(layers)}.")


def build_encoder(vit: str, registers: int, dtype=jnp.float32, attention_impl: str = "auto",
                  pos_grid: int = 37) -> DinoV2Encoder:
  """The DINOv2 ViT/14 variant `vit` (small | base | large | giant) with 0 or 4 registers."""
  if vit not in VIT_VARIANTS:
    raise ValueError(f"vit must be one of {sorted(VIT_VARIANTS)}, got {vit!r}.")
  if registers not in (0, 4):
    raise ValueError(f"registers must be 0 or 4 (the published DINOv2 models), got {registers!r}.")
  return DinoV2Encoder(**VIT_VARIANTS[vit], num_registers=registers, pos_grid=pos_grid,
                       dtype=jnp.dtype(dtype), attention_impl=attention_impl)
