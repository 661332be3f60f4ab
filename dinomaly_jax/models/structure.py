"""The one validator of the Dinomaly model's structure (layers, groups, decoder).

Used by the config check (before any work starts) and by the model builder, so
both accept exactly the same models. Imports nothing but the errors module.
"""
from collections.abc import Sequence

from dinomaly_jax.errors import ConfigError

DECODER_ATTENTION_KINDS = ("linear", "qk_v_linear", "softmax")
CONV_DECODER_KERNELS = (0, 3, 5, 7)  # 0 = transformer decoder


def is_int(v) -> bool:
  """An int that is not a bool (config values)."""
  return isinstance(v, int) and not isinstance(v, bool)


def _require(ok: bool, field: str, expected: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.model.{field} must be {expected}, got {value!r}.")


def check_structure(*, encoder_depth: int, encoder_name: str, target_layers: Sequence[int],
                    fuse_groups: Sequence[Sequence[int]], decoder_depth: int,
                    decoder_attention: str, mask_neighbor_size: int,
                    conv_decoder_kernel: int, context_recentering: bool = False,
                    bottleneck_down_dim: int = 0) -> None:
  """Raises ConfigError naming the first model field that cannot work.

  Rules (the reference `ViTill`): target layers are distinct encoder block indices;
  each loose group indexes both the target-layer list and the decoder's block
  outputs, so its indices lie below min(len(target_layers), decoder_depth); a
  neighbour mask needs attention that forms the N x N weights; context-aware
  recentering needs the class token, which the conv decoder drops.
  """
  layers = list(target_layers)
  _require(bool(layers) and all(is_int(i) and 0 <= i < encoder_depth for i in layers)
           and len(set(layers)) == len(layers), "target_layers",
           f"distinct block indices in [0, {encoder_depth}) for {encoder_name}", layers)
  _require(is_int(decoder_depth) and decoder_depth > 0, "decoder_depth", "a positive integer",
           decoder_depth)
  limit = min(len(layers), decoder_depth)
  groups = [list(g) for g in fuse_groups]
  _require(bool(groups) and all(g and all(is_int(i) and 0 <= i < limit for i in g) for g in groups),
           "fuse_groups",
           f"non-empty groups of indices in [0, {limit}) (into model.target_layers, "
           f"{len(layers)} entries, and the decoder's {decoder_depth} block outputs)", groups)
  _require(decoder_attention in DECODER_ATTENTION_KINDS, "decoder_attention",
           f"one of {list(DECODER_ATTENTION_KINDS)}", decoder_attention)
  _require(conv_decoder_kernel in CONV_DECODER_KERNELS, "conv_decoder_kernel",
           f"one of {list(CONV_DECODER_KERNELS)} (0 = transformer decoder)", conv_decoder_kernel)
  _require(is_int(mask_neighbor_size) and mask_neighbor_size >= 0, "mask_neighbor_size",
           "an integer >= 0 (0 = off)", mask_neighbor_size)
  if mask_neighbor_size:
    _require(not conv_decoder_kernel, "mask_neighbor_size",
             "0 with model.conv_decoder_kernel > 0 (it applies to attention decoders only)",
             mask_neighbor_size)
    _require(decoder_attention != "linear", "mask_neighbor_size",
             "0 with decoder_attention='linear' (a neighbour mask needs 'softmax' or "
             "'qk_v_linear': linear attention never forms the N x N weights)", mask_neighbor_size)
  _require(isinstance(context_recentering, bool), "context_recentering", "true or false",
           context_recentering)
  _require(not (context_recentering and conv_decoder_kernel), "context_recentering",
           "false with model.conv_decoder_kernel > 0 (the conv decoder drops the class token "
           "that recentering subtracts)", context_recentering)
  _require(is_int(bottleneck_down_dim) and bottleneck_down_dim >= 0, "bottleneck_down_dim",
           "an integer >= 0 (0 = Dinomaly's MLP; Dinomaly2: 256)", bottleneck_down_dim)
