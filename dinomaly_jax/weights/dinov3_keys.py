"""Key maps from PyTorch DINOv3 state dicts to the `DinoV3Encoder` parameter tree.

Supported layouts, both first renamed to the official DINOv3 names and then put
into the Flax tree by `dinov2_keys.official_to_params` (shared with DINOv2):
  - official DINOv3 `.pth` (`dinov3_vit{s,b,l}16[plus]_pretrain_*.pth`, `dinov3_vith16plus_*`):
    `cls_token`, `storage_tokens`, `rope_embed.periods`, `patch_embed.proj.*`,
    `blocks.{i}.attn.qkv.{weight,bias,bias_mask}`, `blocks.{i}.ls{1,2}.gamma`,
    `blocks.{i}.mlp.{fc1,fc2}` or SwiGLU `blocks.{i}.mlp.{w1,w2,w3}`;
  - Hugging Face `DINOv3ViTModel` (`embeddings.register_tokens`,
    `[model.]layer.{i}.attention.{q,k,v,o}_proj`, `layer_scale{1,2}.lambda1`,
    `mlp.{up,down}_proj` or gated `mlp.{gate,up,down}_proj`).
Folded on the way: the qkv bias is multiplied by `bias_mask` (which zeroes the
key bias; HF files have no key bias, so it is zero there too); SwiGLU `w1`, `w2`
(HF gate, up) become one `w12`. `rope_embed.periods` must be base ** (4k / d);
it gives the head size d and the RoPE base (HF files: d = 64, base 100, as in
every released model). Any missing, unexpected or misshapen key raises one
`CheckpointError` listing all of them.
"""
import collections
import re
from typing import Any, Mapping

import numpy as np

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.models import dinov3
from dinomaly_jax.models import rope
from dinomaly_jax.weights import dinov2_keys

FAMILY = "dinov3"
DEFAULT_ROPE_BASE = 100.0  # every released DINOv3 (HF files do not store it)
_UNUSED_KEYS = ("mask_token", "norm.weight", "norm.bias")
# Norms used only for the final output or in training (untied cls / local-crop norms).
_UNUSED_PREFIXES = ("cls_norm.", "local_cls_norm.")
_PERIODS_KEY = "rope_embed.periods"

_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.patch_embeddings\.(?:proj\.)?(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^(?:model\.)?layer\.(\d+)\.", r"blocks.\1."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.attention\.o_proj\.", ".attn.proj."),
)
_HF_MLP_RENAMES = ((r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2."))
_HF_SWIGLU_RENAMES = ((r"\.mlp\.down_proj\.", ".mlp.w3."),)  # gate/up are fused into w12
# Official SwiGLU w1 (gated by silu) and w2 take the HF names, so that they fuse the same way.
_OFFICIAL_SWIGLU_RENAMES = ((r"\.mlp\.w1\.", ".mlp.gate_proj."), (r"\.mlp\.w2\.", ".mlp.up_proj."))


def is_dinov3(state: Mapping[str, Any]) -> bool:
  """True for official DINOv3 and HF DINOv3ViTModel state dicts."""
  return any(k in ("storage_tokens", _PERIODS_KEY) or re.match(r"^(model\.)?layer\.\d+\.", k)
             for k in state)


def _hf_to_official(state: dict[str, np.ndarray]):
  """HF names -> official; the absent key bias becomes zeros next to the q and v biases."""
  names = {}
  for key in [k for k in state if k.endswith(".attention.q_proj.bias")]:
    k_bias = key.replace(".q_proj.", ".k_proj.")
    if k_bias not in state and key.replace(".q_proj.", ".v_proj.") in state:
      state[k_bias] = np.zeros_like(state[key])
      names[k_bias] = "(no key bias: zeros)"
  swiglu = any(".mlp.gate_proj." in k for k in state)
  renames = _HF_RENAMES + (_HF_SWIGLU_RENAMES if swiglu else _HF_MLP_RENAMES)
  return dinov2_keys.rename_and_fuse(state, renames, names)


def _official_to_official(state: dict[str, np.ndarray]):
  """Masks the qkv biases with their `bias_mask` and fuses SwiGLU w1/w2 into w12."""
  names, problems = {}, []
  for mask_key in [k for k in state if k.endswith(".attn.qkv.bias_mask")]:
    bias_key = mask_key[:-len("_mask")]
    if bias_key in state and state[bias_key].shape == state[mask_key].shape:
      state[bias_key] = state[bias_key] * state.pop(mask_key)
      names[bias_key] = f"{bias_key} * {mask_key}"
    else:
      problems.append(f"unexpected {mask_key}: shape {state[mask_key].shape}, without a "
                      f"{bias_key} of that shape to mask")
      del state[mask_key]
  official, names, fuse_problems = dinov2_keys.rename_and_fuse(state, _OFFICIAL_SWIGLU_RENAMES, names)
  return official, names, problems + fuse_problems


def to_official(state: Mapping[str, Any]):
  """Any supported layout -> (official-name arrays, official->source names, format, problems)."""
  arrays = {k: dinov2_keys.to_numpy(v) for k, v in state.items()}
  source_format = "hf" if any(k.startswith("embeddings.") for k in arrays) else "official"
  convert = _hf_to_official if source_format == "hf" else _official_to_official
  official, names, problems = convert(arrays)
  return official, names, source_format, problems


def unused_keys(official: Mapping[str, np.ndarray]) -> set[str]:
  """Official keys the encoder does not use (final norms, mask token, RoPE periods)."""
  return {*_UNUSED_KEYS, _PERIODS_KEY, *(k for k in official if k.startswith(_UNUSED_PREFIXES))}


def _rope_from_periods(periods: np.ndarray, problems: list) -> tuple[int | None, float]:
  """(head_dim, base) from official periods base ** (4k / d), k < d/4; checks every period."""
  if periods.ndim != 1 or len(periods) < 2 or periods[0] != 1:
    problems.append(f"{_PERIODS_KEY}: expected base ** (4k / head_dim) periods starting at 1, "
                    f"found shape {periods.shape}")
    return None, DEFAULT_ROPE_BASE
  head_dim = 4 * len(periods)
  base = float(periods[-1]) ** (len(periods) / (len(periods) - 1))
  base = DEFAULT_ROPE_BASE if np.isclose(base, DEFAULT_ROPE_BASE, rtol=1e-4) else base
  expected = rope.rope_periods(head_dim, base)
  if not np.allclose(periods, expected, rtol=1e-5):
    problems.append(f"{_PERIODS_KEY}: not of the form base ** (4k / {head_dim}) (base {base:.4g}); "
                    f"found {periods[:4].tolist()}...")
  return head_dim, base


def detect_architecture(official: Mapping[str, np.ndarray]) -> dict:
  """DinoV3Encoder fields (embed_dim, depth, num_heads, ffn, ffn_hidden_dim, num_registers,
  patch_size, rope_base) and `vit` (a released size's name, or "custom")."""
  blocks = {int(m.group(1)) for k in official if (m := re.match(r"^blocks\.(\d+)\.", k))}
  patch = official.get("patch_embed.proj.weight")
  if patch is None or patch.ndim != 4 or not blocks:
    raise CheckpointError(
        "Not a DINOv3 ViT state dict: no 4-d patch_embed.proj.weight (HF: "
        "embeddings.patch_embeddings.weight) or no blocks "
        f"(first keys: {sorted(official)[:8]}).")
  embed_dim, patch_size = patch.shape[0], patch.shape[-1]
  problems = []
  head_dim, rope_base = dinov3.HEAD_DIM, DEFAULT_ROPE_BASE
  if _PERIODS_KEY in official:
    head_dim, rope_base = _rope_from_periods(official[_PERIODS_KEY], problems)
  if head_dim is not None and embed_dim % head_dim:
    problems.append(f"embedding width {embed_dim} is not a multiple of the head size {head_dim}")
  if problems:
    raise CheckpointError("\n  ".join([f"{len(problems)} problem(s):"] + problems))
  swiglu = any(k.endswith(".mlp.w12.weight") for k in official)
  # The MLP width most blocks have (a damaged block is then reported, not copied).
  widths = collections.Counter(
      v.shape[0] // (2 if swiglu else 1) for k, v in official.items()
      if re.match(r"^blocks\.\d+\.mlp\.(w12|fc1)\.weight$", k))
  hidden = widths.most_common(1)[0][0] if widths else 0
  storage = official.get("storage_tokens")
  arch = dict(embed_dim=embed_dim, depth=max(blocks) + 1, num_heads=embed_dim // head_dim,
              ffn="swiglu" if swiglu else "mlp", ffn_hidden_dim=hidden,
              num_registers=storage.shape[1] if storage is not None and storage.ndim == 3 else 0,
              patch_size=patch_size, rope_base=rope_base)
  released = (patch_size, rope_base, arch["num_registers"]) == (dinov3.PATCH_SIZE, DEFAULT_ROPE_BASE, 4)
  arch["vit"] = next((name for name, fields in dinov3.DINOV3_VARIANTS.items()
                      if released and all(arch[f] == v for f, v in fields.items())), "custom")
  return arch


_ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "ffn", "ffn_hidden_dim", "num_registers",
                "patch_size", "rope_base")


def encoder_from_arch(arch: Mapping[str, Any], **kwargs) -> dinov3.DinoV3Encoder:
  return dinov3.DinoV3Encoder(**{f: arch[f] for f in _ARCH_FIELDS}, **kwargs)


def convert_dinov3_state_dict(state_dict: Mapping, expect_vit: str | None = None,
                              expect_registers: int | None = None,
                              expect_pos_grid: int | None = None) -> tuple[dict, dict]:
  """Official DINOv3 or HF DINOv3ViTModel state dict -> (encoder params, meta).

  As `dinov2_keys.convert_dinov2_state_dict`; a DINOv3 has no position grid, so
  any `expect_pos_grid` is an error.
  """
  official, names, source_format, problems = to_official(state_dict)
  arch = detect_architecture(official)
  dinov2_keys.refuse_unexpected(arch, dict(vit=expect_vit, num_registers=expect_registers,
                                           pos_grid=expect_pos_grid))
  params = dinov2_keys.official_to_params(official, encoder_from_arch(arch), names, problems,
                                          unused_keys(official))
  return params, dict(arch, registers=arch["num_registers"], source_format=source_format,
                      family=FAMILY)
