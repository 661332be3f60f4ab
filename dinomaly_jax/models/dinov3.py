"""DINOv3 ViT/16 encoder in Flax linen, returning raw outputs of chosen blocks.

Same interface as `vit.DinoV2Encoder` (`__call__(images, layers)`, attributes
`embed_dim`, `depth`, `num_heads`, `num_registers`, `patch_size`) and the same
blocks (`vit.Block`: pre-norm, LayerScale, GELU MLP or SwiGLU, fused qkv), with
DINOv3's differences: patch 16, no position table but rotary embeddings of the
patch tokens (`rope.py`), 4 register ("storage") tokens, LayerNorm eps 1e-5.
Token order: [cls, storage tokens..., patches].

Parameter names follow the official DINOv3 module names (`storage_tokens`,
`blocks_{i}/attn/qkv`, `ls1/gamma`, ...). Two official tensors are folded in by
conversion (`weights/dinov3_keys.py`): the key part of the qkv bias is
zeroed by `qkv.bias_mask` (DINOv3 has no key bias), and SwiGLU's separate
`w1`/`w2` become one `w12`, as in DINOv2. The final `norm`, `mask_token` and
the `rope_embed.periods` buffer (a function of `rope_base`) are not in the tree.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dinomaly_jax.models import rope as rope_lib
from dinomaly_jax.models import vit

PATCH_SIZE = 16
HEAD_DIM = 64  # every released DINOv3 ViT up to H+ uses 64-dim heads
# The released ViTs (dinov3_vits16, _vits16plus, _vitb16, _vitl16, _vith16plus).
DINOV3_VARIANTS = {
    "small": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp", ffn_hidden_dim=1536),
    "small_plus": dict(embed_dim=384, depth=12, num_heads=6, ffn="swiglu", ffn_hidden_dim=1536),
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp", ffn_hidden_dim=3072),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp", ffn_hidden_dim=4096),
    "huge_plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn="swiglu", ffn_hidden_dim=5120),
}


class DinoV3Encoder(nn.Module):
  """DINOv3 ViT with RoPE and storage tokens; returns raw block outputs."""
  embed_dim: int
  depth: int
  num_heads: int
  ffn: str = "mlp"  # or "swiglu"
  ffn_hidden_dim: int = 1536
  num_registers: int = 4
  patch_size: int = PATCH_SIZE
  rope_base: float = 100.0
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, layers: Sequence[int]):
    """images: (B, H, W, 3) normalised, H and W multiples of the patch size.

    Returns one (B, 1 + R + h*w, D) float32 array per entry of `layers`
    (0-based block indices); blocks after max(layers) are not computed.
    """
    vit.check_inputs(images, layers, self.patch_size, self.depth, self.ffn)
    x, grid_hw = vit.embed_patches(images, self.patch_size, self.embed_dim, self.dtype)
    batch, dim = x.shape[0], self.embed_dim
    prefix = [self.param("cls_token", nn.initializers.normal(0.02), (1, 1, dim))]
    if self.num_registers:
      prefix.append(self.param("storage_tokens", nn.initializers.normal(0.02),
                               (1, self.num_registers, dim)))
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (batch, *t.shape[1:])) for t in prefix]
    x = jnp.concatenate([*prefix, x], axis=1)  # (B, 1 + R + h*w, D)

    rope = rope_lib.rope_tables(grid_hw, dim // self.num_heads, self.rope_base)
    block = lambda i: vit.Block(self.num_heads, self.ffn, self.ffn_hidden_dim, self.ln_eps,
                                self.dtype, self.attention_impl, name=f"blocks_{i}")
    return vit.run_blocks(x, layers, self.depth, block, self.is_initializing(), rope)


def build_encoder(vit_size: str, registers: int = 4, dtype=jnp.float32,
                  attention_impl: str = "auto") -> DinoV3Encoder:
  """The released DINOv3 ViT/16 `vit_size` (small | small_plus | base | large | huge_plus)."""
  if vit_size not in DINOV3_VARIANTS:
    raise ValueError(f"DINOv3 vit must be one of {sorted(DINOV3_VARIANTS)}, got {vit_size!r}.")
  if registers != 4:
    raise ValueError(f"registers must be 4 for DINOv3 (its released models), got {registers!r}.")
  return DinoV3Encoder(**DINOV3_VARIANTS[vit_size], num_registers=registers,
                       dtype=jnp.dtype(dtype), attention_impl=attention_impl)
