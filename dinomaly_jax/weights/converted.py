"""The converted-parameter directory: `<dir>/params` (orbax; `python -m weight_conversion.convert`)
or `<dir>/params.safetensors` (a host's cached conversion of a .pth), and `<dir>/meta.json`.

The saved tree is `{"encoder": ...}` for DINOv2 checkpoints and
`{"encoder": ..., "bottleneck": ..., "decoder": ...}` for trained Dinomaly
(ViTill) checkpoints.
"""
import json
import pathlib

from etils import epath
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from dinomaly_jax import storage
from dinomaly_jax.weights import convert

PARAMS_DIR = "params"
PARAMS_FILE = "params.safetensors"  # a host's own converted copy (save_host_copy)
META_FILE = "meta.json"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def save_params(out_dir, tree: dict, meta: dict) -> epath.Path:
  """Writes `tree` with orbax and `meta` as JSON into `out_dir` (overwriting): the directory
  `python -m weight_conversion.convert` makes, for one process."""
  out_dir = storage.as_path(storage.absolute(out_dir))
  storage.makedirs(out_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir / PARAMS_DIR, tree, force=True)
  storage.write_text(out_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
  return out_dir


def save_host_copy(out_dir, tree: dict, meta: dict) -> None:
  """Writes `tree` as one safetensors file and `meta` as JSON into `out_dir`: a host's own
  converted copy. Any process of a multi-host job writes it alone (orbax would write on
  process 0 only and wait for the others)."""
  flat = {"/".join(path): np.ascontiguousarray(leaf) for path, leaf in _flatten(tree)}
  storage.write_bytes(storage.join(out_dir, PARAMS_FILE), safetensors.numpy.save(flat))
  storage.write_text(storage.join(out_dir, META_FILE), json.dumps(meta, indent=2, sort_keys=True))


def _flatten(tree: dict, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(value)


def _unflatten(flat: dict) -> dict:
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def read_meta(path) -> dict:
  """The meta.json of a converted directory (vit, registers, source)."""
  path = storage.absolute(path)
  has_params = (storage.isdir(storage.join(path, PARAMS_DIR))
                or storage.isfile(storage.join(path, PARAMS_FILE)))
  if not storage.isfile(storage.join(path, META_FILE)) or not has_params:
    raise FileNotFoundError(
        f"{path} is not a converted parameter directory (expected {META_FILE} and {PARAMS_DIR}/); "
        "create one with: python -m weight_conversion.convert --checkpoint FILE --out DIR")
  return json.loads(storage.read_text(storage.join(path, META_FILE)))


def load_params(path) -> tuple[dict, dict]:
  """Reads a converted directory (orbax, or a host's safetensors copy): (tree of numpy arrays, meta)."""
  meta = read_meta(path)
  path = storage.absolute(path)
  if storage.isfile(storage.join(path, PARAMS_FILE)):
    return _unflatten(safetensors.numpy.load(storage.read_bytes(storage.join(path, PARAMS_FILE)))), meta
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(storage.as_path(path) / PARAMS_DIR)
  return tree, meta


def load_encoder(path, vit: str | None = None, registers: int | None = None) -> tuple[dict, dict]:
  """Encoder params and meta from a converted directory or a PyTorch checkpoint file.

  A .pth/.bin/.safetensors file is converted in memory (needs torch). If `vit`
  or `registers` are given, a checkpoint of another architecture is an error.
  """
  path = pathlib.Path(path)
  if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES:
    tree, meta = convert.convert_file(path)
  else:
    tree, meta = load_params(path)
  for field, wanted in (("vit", vit), ("registers", registers)):
    if wanted is not None and meta.get(field) != wanted:
      raise ValueError(f"Encoder weights {path} are {field}={meta.get(field)!r}, "
                       f"but the config asks for {field}={wanted!r}.")
  return tree["encoder"], meta
