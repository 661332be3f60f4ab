"""The converted-parameter directory: `<dir>/params` (orbax) and `<dir>/meta.json`.

The saved tree is `{"encoder": ...}` for DINOv2 checkpoints and
`{"encoder": ..., "bottleneck": ..., "decoder": ...}` for trained Dinomaly
(ViTill) checkpoints. Written by `python -m weight_conversion.convert`.
"""
import json
import pathlib

from etils import epath
import orbax.checkpoint as ocp

from dinomaly_jax import storage

from dinomaly_jax.weights import convert

PARAMS_DIR = "params"
META_FILE = "meta.json"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def save_params(out_dir, tree: dict, meta: dict) -> epath.Path:
  """Writes `tree` with orbax and `meta` as JSON into `out_dir` (overwriting)."""
  out_dir = storage.as_path(storage.absolute(out_dir))
  storage.makedirs(out_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir / PARAMS_DIR, tree, force=True)
  storage.write_text(out_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
  return out_dir


def read_meta(path) -> dict:
  """The meta.json of a directory written by `save_params` (vit, registers, source)."""
  path = storage.as_path(storage.absolute(path))
  if not storage.isfile(path / META_FILE) or not storage.isdir(path / PARAMS_DIR):
    raise FileNotFoundError(
        f"{path} is not a converted parameter directory (expected {META_FILE} and {PARAMS_DIR}/); "
        "create one with: python -m weight_conversion.convert --checkpoint FILE --out DIR")
  return json.loads(storage.read_text(path / META_FILE))


def load_params(path) -> tuple[dict, dict]:
  """Reads a directory written by `save_params`: (tree of numpy arrays, meta)."""
  path = storage.as_path(storage.absolute(path))
  meta = read_meta(path)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(path / PARAMS_DIR)
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
