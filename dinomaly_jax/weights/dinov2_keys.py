"""Key maps from PyTorch DINOv2 state dicts to the `DinoV2Encoder` parameter tree.

Every supported layout is first renamed to the official DINOv2 names
(`blocks.{i}.attn.qkv.weight`, ...), then one map turns official names into
Flax paths (`blocks_{i}/attn/qkv/kernel`, transposed). Supported layouts:
  - official DINOv2 `.pth` (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), also
    with chunked `blocks.{chunk}.{i}.` keys (FSDP `block_chunks > 0`);
  - Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`, both the Hub file
    names (`attention.attention.query`, `mlp.weights_in`) and transformers 5
    names (`attention.q_proj`, `mlp.gate_proj`);
  - timm `vit_*_patch14[_reg4]_dinov2` (`reg_token`, pos_embed without the cls
    row, cls_token holding the cls position embedding; packed SwiGLU `mlp.fc1`).
The architecture is read from the shapes; any missing, unexpected or misshapen
key raises one `CheckpointError` listing all of them.
"""
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.models import vit

FAMILY = "dinov2"
# Official keys that the encoder does not use (features are raw block outputs).
UNUSED_OFFICIAL_KEYS = ("mask_token", "norm.weight", "norm.bias")
DINOV2_HEAD_DIM = 64  # every published DINOv2 ViT uses 64-dim heads


def to_numpy(value) -> np.ndarray:
  """A float32 numpy copy of a torch tensor or array (bf16/fp16 included)."""
  if hasattr(value, "detach"):
    return value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


# --- Source layout -> official names -------------------------------------------

_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.(?:weights_out|down_proj)\.", ".mlp.w3."),
)
# HF parts fused into one official tensor (concatenated along the output axis).
_HF_FUSED = (
    (re.compile(r"^(blocks\.\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$"),
     "{0}.attn.qkv.{2}", {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}),
    (re.compile(r"^(blocks\.\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$"),
     "{0}.mlp.w12.{2}", {"gate_proj": 0, "up_proj": 1}),
)


def _is_packed_swiglu(state: Mapping[str, np.ndarray], fc1_weight_key: str) -> bool:
  """timm's SwiGLUPacked: `mlp.fc1` emits twice the width that `mlp.fc2` takes."""
  fc2 = state.get(fc1_weight_key.replace(".fc1.", ".fc2."))
  return fc2 is not None and fc2.ndim == 2 and state[fc1_weight_key].shape[0] == 2 * fc2.shape[1]


def detect_format(state: Mapping[str, np.ndarray]) -> str:
  """'hf', 'timm' or 'official' (timm ViT-S/B/L without registers equal official)."""
  if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
    return "hf"
  if "reg_token" in state or any(k.endswith(".mlp.fc1.weight") and _is_packed_swiglu(state, k)
                                 for k in state):
    return "timm"
  return "official"


def _hf_to_official(state: dict[str, np.ndarray]):
  """Renames HF keys; fuses q/k/v and gate/up. Returns (state, source_names, missing)."""
  return rename_and_fuse(state, _HF_RENAMES)


def rename_and_fuse(state: Mapping[str, np.ndarray], renames, names: Mapping[str, str] | None = None):
  """Applies the regex `renames` to every key, then fuses HF q/k/v into `blocks.{i}.attn.qkv`
  and gate/up into `blocks.{i}.mlp.w12`. `names` maps keys of `state` to their file names.
  Returns (state, official -> file names, problems)."""
  renamed, new_names = {}, {}
  for key, value in state.items():
    new = key
    for pattern, replacement in renames:
      new = re.sub(pattern, replacement, new)
    renamed[new], new_names[new] = value, (names or {}).get(key, key)
  names = new_names
  fused_parts: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
  for key in list(renamed):
    for pattern, template, order in _HF_FUSED:
      match = pattern.match(key)
      if match:
        target = template.format(*match.groups())
        fused_parts.setdefault(target, {})[order[match.group(2)]] = (names.pop(key), renamed.pop(key))
  missing = []
  for target, parts in fused_parts.items():
    count = 3 if ".attn.qkv." in target else 2
    found = [parts[i] for i in sorted(parts)]
    if len(parts) < count:
      missing.append(f"incomplete {target}: it fuses {count} tensors, found only {[n for n, _ in found]}")
      continue
    renamed[target] = np.concatenate([v for _, v in found], axis=0)
    names[target] = " + ".join(n for n, _ in found)
  return renamed, names, missing


def _timm_or_official_to_official(state: dict[str, np.ndarray]):
  """Unchunks `blocks.{c}.{i}.`, renames timm tokens and packed SwiGLU."""
  renamed, names = {}, {}
  for key, value in state.items():
    new = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
    new = "register_tokens" if new == "reg_token" else new
    renamed[new], names[new] = value, key
  pos = renamed.get("pos_embed")
  if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
    # timm `no_embed_class`: the cls position embedding is already in cls_token.
    renamed["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  for key in [k for k in renamed if k.endswith(".mlp.fc1.weight")]:
    if _is_packed_swiglu(renamed, key):
      for suffix in ("weight", "bias"):
        for old, new in (("fc1", "w12"), ("fc2", "w3")):
          source = key.replace("fc1.weight", f"{old}.{suffix}")
          if source in renamed:
            target = source.replace(f".{old}.", f".{new}.")
            renamed[target], names[target] = renamed.pop(source), names.pop(source)
  return renamed, names, []


def to_official(state: Mapping[str, Any]):
  """Any supported layout -> (official-name arrays, official->source names, format, problems)."""
  arrays = {k: to_numpy(v) for k, v in state.items()}
  source_format = detect_format(arrays)
  convert = _hf_to_official if source_format == "hf" else _timm_or_official_to_official
  official, names, problems = convert(arrays)
  return official, names, source_format, problems


def unused_keys(official: Mapping[str, np.ndarray]) -> tuple[str, ...]:
  """Official keys the encoder does not use (the same for every DINOv2 checkpoint)."""
  del official
  return UNUSED_OFFICIAL_KEYS


# --- Architecture from shapes ----------------------------------------------------


def detect_architecture(official: Mapping[str, np.ndarray]) -> dict:
  """Encoder fields (embed_dim, depth, num_heads, ffn, num_registers, pos_grid) and `vit`."""
  anchor = next((k for k in ("cls_token", "pos_embed", "patch_embed.proj.bias") if k in official), None)
  blocks = {int(m.group(1)) for k in official if (m := re.match(r"^blocks\.(\d+)\.", k))}
  if anchor is None or not blocks:
    raise CheckpointError(
        "Not a DINOv2 ViT state dict: found none of cls_token / pos_embed / patch_embed.proj.bias "
        f"or no blocks.* keys (first keys: {sorted(official)[:8]}).")
  embed_dim = official[anchor].shape[-1]
  if embed_dim % DINOV2_HEAD_DIM:
    raise CheckpointError(f"Embedding width {embed_dim} (from {anchor}) is not a multiple of "
                          f"the DINOv2 head size {DINOV2_HEAD_DIM}.")
  pos_grid = 37
  if "pos_embed" in official:
    positions = official["pos_embed"].shape[1] - 1
    pos_grid = math.isqrt(positions)
    if pos_grid * pos_grid != positions:
      raise CheckpointError(f"pos_embed {official['pos_embed'].shape}: {positions} patch positions "
                            "do not form a square grid.")
  arch = dict(
      embed_dim=embed_dim, depth=max(blocks) + 1, num_heads=embed_dim // DINOV2_HEAD_DIM,
      ffn="swiglu" if any(".mlp.w12." in k for k in official) else "mlp",
      num_registers=official["register_tokens"].shape[1] if "register_tokens" in official else 0,
      pos_grid=pos_grid)
  arch["vit"] = next((name for name, fields in vit.VIT_VARIANTS.items()
                      if all(arch[f] == v for f, v in fields.items())), "custom")
  return arch


def encoder_from_arch(arch: Mapping[str, Any], **kwargs) -> vit.DinoV2Encoder:
  fields = ("embed_dim", "depth", "num_heads", "ffn", "num_registers", "pos_grid")
  return vit.DinoV2Encoder(**{f: arch[f] for f in fields}, **kwargs)


# --- Official names -> Flax tree ----------------------------------------------------


def official_name(path: tuple[str, ...]) -> str:
  """Flax path -> official key, e.g. ('blocks_3', 'norm1', 'scale') -> 'blocks.3.norm1.weight'."""
  parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", p) for p in path]
  if parts[0] == "patch_embed":
    parts.insert(1, "proj")
  if parts[-1] in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def _torch_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax parameter (Linear / Conv kernels are transposed)."""
  if path[-1] != "kernel":
    return tuple(shape)
  if len(shape) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def expected_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax path -> shape of every parameter of `model`, without allocating them."""
  images = jnp.zeros((1, model.patch_size, model.patch_size, 3), jnp.float32)
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, [0])["params"])
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def official_to_params(official: Mapping[str, np.ndarray], model, names: Mapping[str, str],
                       problems=(), unused=UNUSED_OFFICIAL_KEYS):
  """Builds the Flax tree of `model` (a DINOv2 or DINOv3 encoder); keys in `unused`
  are ignored. Raises one CheckpointError listing every bad key."""
  problems = list(problems)

  def describe(key):  # the file's own key name, and the official name if different
    source = names.get(key, key)
    return key if source == key else f"{source} (-> {key})"

  flat, expected_keys = {}, set(unused)
  for path, shape in expected_shapes(model).items():
    key, want = official_name(path), _torch_layout(path, shape)
    expected_keys.add(key)
    if key not in official:
      problems.append(f"missing {key}: expected shape {want}")
    elif official[key].shape != want:
      problems.append(f"shape mismatch {describe(key)}: expected {want}, found {official[key].shape}")
    else:
      flat[path] = _flax_layout(path, official[key])
  problems += [f"unexpected {describe(k)}: shape {official[k].shape}"
               for k in sorted(official) if k not in expected_keys]
  if problems:
    raise CheckpointError("\n  ".join([f"{len(problems)} problem(s):"] + problems))
  return _unflatten(flat)


def convert_dinov2_state_dict(state_dict: Mapping, prefix: str = "", expect_vit: str | None = None,
                              expect_registers: int | None = None,
                              expect_pos_grid: int | None = None) -> tuple[dict, dict]:
  """DINOv2 encoder state dict (keys under `prefix`) -> (encoder params, meta).

  The architecture is read from the shapes; `expect_*` turn a different one
  into an error. Raises CheckpointError listing every bad key.
  """
  state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not state:
    raise CheckpointError(f"No keys start with {prefix!r} (first keys: {sorted(state_dict)[:8]}).")
  official, names, source_format, problems = to_official(state)
  arch = detect_architecture(official)
  refuse_unexpected(arch, dict(vit=expect_vit, num_registers=expect_registers,
                               pos_grid=expect_pos_grid))
  params = official_to_params(official, encoder_from_arch(arch), names, problems)
  return params, dict(arch, registers=arch["num_registers"], source_format=source_format,
                      family=FAMILY)


def refuse_unexpected(arch: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises a CheckpointError when `arch` differs from a given (not None) `expected` field."""
  wrong = [f"{field}={arch.get(field)!r} (expected {want!r})"
           for field, want in expected.items() if want is not None and arch.get(field) != want]
  if wrong:
    raise CheckpointError(f"Checkpoint is not the expected architecture: {', '.join(wrong)}.")
