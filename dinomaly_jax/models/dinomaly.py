"""Dinomaly: frozen DINOv2 (or DINOv3) encoder -> noisy bottleneck -> decoder -> loose groups.

Parameter tree: {"encoder": ..., "bottleneck": ..., "decoder": ...}.
Data flow (reference `ViTill`):
  the encoder's target-layer outputs (B, N, D), N = 1 + R + h*w, carry no gradient;
  their mean over layers is the bottleneck input (prefix tokens included);
  the decoder's block outputs are reversed; both lists are grouped by `fuse_groups`
  (each group a plain mean) and become (B, h, w, D) maps without the prefix tokens.
With the conv decoder (`conv_decoder_kernel > 0`) prefix tokens are dropped before
the bottleneck, as the reference does for it (`remove_class_token=True`).

Dinomaly2 switches: `context_recentering` makes each encoder group's target
layer_norm(patch tokens - class token) over the features (eps 1e-8, no affine; the
decoder side unchanged); `bottleneck_down_dim > 0` uses the two-part bottleneck.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinomaly_jax.models import decoder as decoder_lib
from dinomaly_jax.models import encoders
from dinomaly_jax.models import structure


RECENTERING_EPS = 1e-8


def recentre(tokens: jax.Array, num_patches: int) -> jax.Array:
  """Context-aware recentering: (B, N, D) fused tokens, class token first -> (B, num_patches, D)
  layer_norm(patches - class token) over D, eps 1e-8, no affine parameters."""
  centred = tokens[:, tokens.shape[1] - num_patches:] - tokens[:, :1]  # (B, hw, D)
  mean = jnp.mean(centred, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(centred - mean), axis=-1, keepdims=True)
  return (centred - mean) * jax.lax.rsqrt(var + RECENTERING_EPS)


def _group_maps(tokens: Sequence[jax.Array], groups, grid_hw, *,
                recentre_groups: bool = False) -> list[jax.Array]:
  """tokens: list of (B, N, D) -> one (B, h, w, D) float32 mean per group (patches only;
  recentre_groups: each group's patches recentred on its class token, see `recentre`)."""
  h, w = grid_hw
  maps = []
  for group in groups:
    mean = jnp.mean(jnp.stack([tokens[i] for i in group]), axis=0).astype(jnp.float32)  # (B, N, D)
    patches = recentre(mean, h * w) if recentre_groups else mean[:, mean.shape[1] - h * w:]
    maps.append(patches.reshape(mean.shape[0], h, w, mean.shape[-1]))
  return maps


class Dinomaly(nn.Module):
  encoder: nn.Module  # a DinoV2Encoder or DinoV3Encoder
  target_layers: Sequence[int]
  fuse_groups: Sequence[Sequence[int]]
  bottleneck_ratio: int = 4
  bottleneck_dropout: float = 0.2
  decoder_depth: int = 8
  decoder_attention: str = "linear"
  linear_attention_eps: float = 0.0
  mask_neighbor_size: int = 0
  conv_decoder_kernel: int = 0
  context_recentering: bool = False  # Dinomaly2: encoder targets recentred on the class token
  bottleneck_down_dim: int = 0  # Dinomaly2: > 0 = the two-part bottleneck's first width
  dtype: Any = jnp.float32

  def setup(self):
    structure.check_structure(
        encoder_depth=self.encoder.depth, encoder_name=type(self.encoder).__name__,
        target_layers=self.target_layers, fuse_groups=self.fuse_groups,
        decoder_depth=self.decoder_depth, decoder_attention=self.decoder_attention,
        mask_neighbor_size=self.mask_neighbor_size, conv_decoder_kernel=self.conv_decoder_kernel,
        context_recentering=self.context_recentering, bottleneck_down_dim=self.bottleneck_down_dim)
    self.bottleneck = decoder_lib.make_bottleneck(self.bottleneck_ratio, self.bottleneck_dropout,
                                                  self.bottleneck_down_dim, self.dtype)
    self.decoder = decoder_lib.Decoder(
        depth=self.decoder_depth, num_heads=self.encoder.num_heads,
        attention=self.decoder_attention, linear_eps=self.linear_attention_eps,
        mask_neighbor_size=self.mask_neighbor_size, conv_kernel=self.conv_decoder_kernel,
        dtype=self.dtype)

  def grid_hw(self, images) -> tuple[int, int]:
    return images.shape[1] // self.encoder.patch_size, images.shape[2] // self.encoder.patch_size

  def encode(self, images):
    """(B, H, W, 3) -> (bottleneck_input (B, N, D), enc_groups: list of (B, h, w, D))."""
    grid_hw = self.grid_hw(images)
    features = [jax.lax.stop_gradient(f) for f in self.encoder(images, list(self.target_layers))]
    if self.conv_decoder_kernel > 0:
      features = [f[:, f.shape[1] - grid_hw[0] * grid_hw[1]:] for f in features]
    bottleneck_input = jnp.mean(jnp.stack(features), axis=0)  # (B, N, D)
    return bottleneck_input, _group_maps(features, self.fuse_groups, grid_hw,
                                         recentre_groups=self.context_recentering)

  def decode(self, bottleneck_input, grid_hw, *, train: bool):
    """(B, N, D) bottleneck input -> dec_groups: list of (B, h, w, D) float32."""
    x = self.bottleneck(bottleneck_input, train=train)
    outputs = self.decoder(x, tuple(grid_hw))[::-1]  # last block first
    return _group_maps(outputs, self.fuse_groups, grid_hw)

  def __call__(self, images, *, train: bool):
    """(B, H, W, 3) -> (enc_groups, dec_groups), lists of (B, h, w, D) float32."""
    bottleneck_input, enc_groups = self.encode(images)
    return enc_groups, self.decode(bottleneck_input, self.grid_hw(images), train=train)


def check_model_config(model_config) -> None:
  """Raises ConfigError naming the first `config.model` structure field that cannot work."""
  structure.check_structure(
      encoder_depth=encoders.depth(model_config.family, model_config.vit),
      encoder_name=f"{model_config.family} ViT-{model_config.vit}", target_layers=model_config.target_layers,
      fuse_groups=model_config.fuse_groups, decoder_depth=model_config.decoder_depth,
      decoder_attention=model_config.decoder_attention,
      mask_neighbor_size=model_config.mask_neighbor_size,
      conv_decoder_kernel=model_config.conv_decoder_kernel,
      context_recentering=model_config.context_recentering,
      bottleneck_down_dim=model_config.bottleneck_down_dim)


def build_model(model_config) -> Dinomaly:
  """Dinomaly from `config.model` (see config_base.py)."""
  dtype = jnp.dtype(model_config.dtype)
  encoder = encoders.build_encoder(model_config.family, model_config.vit, model_config.registers,
                                   dtype, model_config.attention_impl)
  check_model_config(model_config)
  return Dinomaly(
      encoder=encoder,
      target_layers=tuple(model_config.target_layers),
      fuse_groups=tuple(tuple(g) for g in model_config.fuse_groups),
      bottleneck_ratio=model_config.bottleneck_ratio,
      bottleneck_dropout=model_config.bottleneck_dropout,
      decoder_depth=model_config.decoder_depth,
      decoder_attention=model_config.decoder_attention,
      linear_attention_eps=model_config.linear_attention_eps,
      mask_neighbor_size=model_config.mask_neighbor_size,
      conv_decoder_kernel=model_config.conv_decoder_kernel,
      context_recentering=model_config.context_recentering,
      bottleneck_down_dim=model_config.bottleneck_down_dim,
      dtype=dtype)
