"""PyTorch checkpoint files -> our parameter tree and meta (format detected from the keys).

Supported: official DINOv2 .pth (plain or chunked), Hugging Face Dinov2(WithRegisters)Model
.safetensors/.bin, timm `vit_*_patch14[_reg4]_dinov2` state dicts (key maps in
dinov2_keys.py), official DINOv3 .pth and Hugging Face DINOv3ViTModel files (dinov3_keys.py),
and trained reference Dinomaly (ViTill) and Dinomaly2 state dicts (vitill_keys.py).
The command line is `python -m weight_conversion.convert`.
"""
import pathlib
from typing import Mapping

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.weights import dinov2_keys
from dinomaly_jax.weights import dinov3_keys
from dinomaly_jax.weights import vitill_keys
from dinomaly_jax.weights.torch_files import load_state_dict

_VITILL_PREFIXES = ("bottleneck.", "decoder.")


def is_vitill_state_dict(state_dict: Mapping) -> bool:
  return any(k.startswith(_VITILL_PREFIXES) for k in state_dict)


def convert_state_dict(state_dict: Mapping, **expect) -> tuple[dict, dict]:
  """Any supported state dict -> (tree to save, meta); `expect` as above."""
  if is_vitill_state_dict(state_dict):
    _, meta = dinov2_keys.convert_dinov2_state_dict(state_dict, prefix="encoder.", **expect)
    tree = vitill_keys.convert_vitill(state_dict)
    if "down" in tree["bottleneck"]:  # evaluate with method=dinomaly2 (model.bottleneck_down_dim)
      return tree, dict(meta, source_format="dinomaly2",
                        bottleneck_down_dim=int(tree["bottleneck"]["down"]["kernel"].shape[1]))
    return tree, dict(meta, source_format="dinomaly-vitill")
  if dinov3_keys.is_dinov3(state_dict):
    params, meta = dinov3_keys.convert_dinov3_state_dict(state_dict, **expect)
  else:
    params, meta = dinov2_keys.convert_dinov2_state_dict(state_dict, **expect)
  return {"encoder": params}, meta


def convert_file(path, **expect) -> tuple[dict, dict]:
  """Reads and converts one checkpoint file; errors name the file."""
  state_dict = load_state_dict(path)
  try:
    tree, meta = convert_state_dict(state_dict, **expect)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return tree, dict(meta, source_file=str(pathlib.Path(path).absolute()))
