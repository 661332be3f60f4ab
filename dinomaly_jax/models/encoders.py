"""The frozen encoder families Dinomaly can use: DINOv2 ViT/14 and DINOv3 ViT/16.

One place that maps config fields (model.family, model.vit, model.registers) to
an encoder module, its depth and its patch size.
"""
import jax.numpy as jnp

from dinomaly_jax.models import dinov3
from dinomaly_jax.models import vit

FAMILIES = ("dinov2", "dinov3")
_VARIANTS = {"dinov2": vit.VIT_VARIANTS, "dinov3": dinov3.DINOV3_VARIANTS}
_PATCH_SIZE = {"dinov2": 14, "dinov3": dinov3.PATCH_SIZE}
_REGISTERS = {"dinov2": (0, 4), "dinov3": (4,)}


def sizes(family: str) -> tuple[str, ...]:
  """The `vit` names of a family, e.g. ('small', 'base', 'large', 'giant') for dinov2."""
  return tuple(_VARIANTS[family])


def depth(family: str, vit_size: str) -> int:
  return _VARIANTS[family][vit_size]["depth"]


def patch_size(family: str) -> int:
  return _PATCH_SIZE[family]


def register_counts(family: str) -> tuple[int, ...]:
  return _REGISTERS[family]


def build_encoder(family: str, vit_size: str, registers: int, dtype=jnp.float32,
                  attention_impl: str = "auto"):
  """The encoder module of `family` (dinov2 | dinov3) and size `vit_size`."""
  if family == "dinov3":
    return dinov3.build_encoder(vit_size, registers, dtype, attention_impl)
  if family == "dinov2":
    return vit.build_encoder(vit_size, registers, dtype, attention_impl)
  raise ValueError(f"encoder family must be one of {FAMILIES}, got {family!r}.")
