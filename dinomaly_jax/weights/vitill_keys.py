"""Trained reference Dinomaly (`ViTill`) or Dinomaly2 state dict -> our {encoder, bottleneck,
decoder} tree.

Reference key names (models/uad.py ViTill with bMlp, VitBlock / ConvBlock):
  encoder.*                                   DINOv2 keys (see convert_dinov2_state_dict)
  bottleneck.0.fc{1,2}.{weight,bias}          the noisy bottleneck MLP
Dinomaly2 (its models/uad.py `Dinomaly`, bottleneck a ModuleList of two nn.Sequential):
  bottleneck.0.0.{weight,bias}                Linear(D -> 256)            -> bottleneck/down
  bottleneck.1.0.{weight,bias}                Linear(256 -> 4D)           -> bottleneck/fc1
  bottleneck.1.3.{weight,bias}                Linear(4D -> D)             -> bottleneck/fc2
  decoder.{i}.norm{1,2}.{weight,bias}
  decoder.{i}.attn.{qkv,proj}.{weight,bias}   attention decoders (any attention kind)
  decoder.{i}.conv.pwconv{1,2}.weight, decoder.{i}.conv.dwconv.weight   conv decoder
  decoder.{i}.mlp.fc{1,2}.{weight,bias}
The dimensions (D, bottleneck ratio, depth, conv kernel) are read from the shapes;
every missing, unexpected or misshapen key is reported in one CheckpointError.
"""
import re
from typing import Mapping

import numpy as np

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.weights import dinov2_keys
from dinomaly_jax.weights.dinov2_keys import to_numpy

_BLOCK_KEY = re.compile(r"^decoder\.(\d+)\.")


def _linear(prefix: str, in_dim: int, out_dim: int, bias: bool = True) -> dict:
  """Torch key -> (flax sub-path, torch shape) for one nn.Linear."""
  keys = {f"{prefix}.weight": ("kernel", (out_dim, in_dim))}
  if bias:
    keys[f"{prefix}.bias"] = ("bias", (out_dim,))
  return keys


DINOMALY2_DOWN_KEY = "bottleneck.0.0.weight"


def _expected_keys(dim: int, hidden: int, depth: int, conv_kernel: int, down_dim: int = 0) -> dict:
  """Torch key -> (flax path, torch shape) of every bottleneck and decoder tensor
  (down_dim > 0: Dinomaly2's two-part bottleneck)."""
  expected = {}

  def add(flax_prefix, entries):
    for key, (leaf, shape) in entries.items():
      expected[key] = (flax_prefix + (leaf,), shape)

  if down_dim:
    add(("bottleneck", "down"), _linear("bottleneck.0.0", dim, down_dim))
    add(("bottleneck", "fc1"), _linear("bottleneck.1.0", down_dim, hidden))
    add(("bottleneck", "fc2"), _linear("bottleneck.1.3", hidden, dim))
  else:
    add(("bottleneck", "fc1"), _linear("bottleneck.0.fc1", dim, hidden))
    add(("bottleneck", "fc2"), _linear("bottleneck.0.fc2", hidden, dim))
  for i in range(depth):
    t, f = f"decoder.{i}", ("decoder", f"blocks_{i}")
    for norm in ("norm1", "norm2"):
      expected[f"{t}.{norm}.weight"] = (f + (norm, "scale"), (dim,))
      expected[f"{t}.{norm}.bias"] = (f + (norm, "bias"), (dim,))
    if conv_kernel:
      add(f + ("conv", "pwconv1"), _linear(f"{t}.conv.pwconv1", dim, 2 * dim, bias=False))
      expected[f"{t}.conv.dwconv.weight"] = (f + ("conv", "dwconv", "kernel"),
                                             (2 * dim, 1, conv_kernel, conv_kernel))
      add(f + ("conv", "pwconv2"), _linear(f"{t}.conv.pwconv2", 2 * dim, dim, bias=False))
    else:
      add(f + ("attn", "qkv"), _linear(f"{t}.attn.qkv", dim, 3 * dim))
      add(f + ("attn", "proj"), _linear(f"{t}.attn.proj", dim, dim))
    add(f + ("mlp", "fc1"), _linear(f"{t}.mlp.fc1", dim, 4 * dim))
    add(f + ("mlp", "fc2"), _linear(f"{t}.mlp.fc2", 4 * dim, dim))
  return expected


def _to_flax(value: np.ndarray) -> np.ndarray:
  if value.ndim == 2:  # Linear (out, in) -> (in, out)
    return value.T
  if value.ndim == 4:  # depthwise Conv2d (C, 1, k, k) -> (k, k, 1, C)
    return value.transpose(2, 3, 1, 0)
  return value


def _matrix(state_dict: Mapping, key: str, what: str):
  value = state_dict.get(key)
  if value is None or len(value.shape) != 2:
    raise CheckpointError(f"Not a {what} state dict: {key} is missing or not 2-D "
                          f"(first keys: {sorted(state_dict)[:8]}).")
  return value


def describe_architecture(state_dict: Mapping) -> dict:
  """dim, bottleneck hidden size, decoder depth, conv kernel (0 = attention) and the
  two-part bottleneck's first width (down_dim, 0 = Dinomaly's MLP) from shapes."""
  if DINOMALY2_DOWN_KEY in state_dict:
    down = _matrix(state_dict, DINOMALY2_DOWN_KEY, "Dinomaly2")  # (down_dim, D)
    dim, down_dim = int(down.shape[1]), int(down.shape[0])
    hidden = int(_matrix(state_dict, "bottleneck.1.0.weight", "Dinomaly2").shape[0])  # (4D, down_dim)
  else:
    fc1 = _matrix(state_dict, "bottleneck.0.fc1.weight", "Dinomaly ViTill")  # (hidden, D)
    dim, hidden, down_dim = int(fc1.shape[1]), int(fc1.shape[0]), 0
  depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
  dwconv = next((state_dict[k] for k in state_dict if k.endswith(".conv.dwconv.weight")), None)
  return dict(dim=dim, hidden=hidden, depth=depth, down_dim=down_dim,
              conv_kernel=int(dwconv.shape[-1]) if dwconv is not None else 0)


def convert_vitill(state_dict: Mapping) -> dict:
  """ViTill state dict (torch tensors or arrays) -> {"encoder", "bottleneck", "decoder"} trees."""
  encoder_params, _ = dinov2_keys.convert_dinov2_state_dict(state_dict, prefix="encoder.")
  trained = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
  arch = describe_architecture(trained)
  if arch["depth"] == 0:
    raise CheckpointError("ViTill state dict has no decoder.{i}.* keys.")
  expected = _expected_keys(**arch)
  problems, tree = [], {"bottleneck": {}, "decoder": {}}
  for key, (path, shape) in expected.items():
    if key not in trained:
      problems.append(f"missing {key}: expected shape {shape}")
      continue
    value = to_numpy(trained[key])
    if value.shape != shape:
      problems.append(f"shape mismatch {key}: expected {shape}, found {value.shape}")
      continue
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = _to_flax(value)
  problems += [f"unexpected {k}: shape {tuple(trained[k].shape)}"
               for k in sorted(trained) if k not in expected]
  if problems:
    raise CheckpointError("\n  ".join(
        [f"{'Dinomaly2' if arch['down_dim'] else 'ViTill'} state dict (D={arch['dim']}, "
         f"depth={arch['depth']}, conv_kernel={arch['conv_kernel']}): {len(problems)} problem(s):"]
        + problems))
  return dict(encoder=encoder_params, **tree)
