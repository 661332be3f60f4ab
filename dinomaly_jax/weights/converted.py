"""The converted-parameter directory: `<dir>/params` (orbax) and `<dir>/meta.json`.

The saved tree is `{"encoder": ...}` for DINOv2 checkpoints and
`{"encoder": ..., "bottleneck": ..., "decoder": ...}` for trained Dinomaly
(ViTill) checkpoints. Written by `python -m weight_conversion.convert`.
"""
import json
import pathlib

import orbax.checkpoint as ocp

from dinomaly_jax.weights import convert

PARAMS_DIR = "params"
META_FILE = "meta.json"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def save_params(out_dir, tree: dict, meta: dict) -> pathlib.Path:
  """Writes `tree` with orbax and `meta` as JSON into `out_dir` (overwriting)."""
  out_dir = pathlib.Path(out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir / PARAMS_DIR, tree, force=True)
  (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
  return out_dir


def read_meta(path) -> dict:
  """The meta.json of a directory written by `save_params` (vit, registers, source)."""
  path = pathlib.Path(path).absolute()
  if not (path / META_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
    raise FileNotFoundError(
        f"{path} is not a converted parameter directory (expected {META_FILE} and {PARAMS_DIR}/); "
        "create one with: python -m weight_conversion.convert --checkpoint FILE --out DIR")
  return json.loads((path / META_FILE).read_text())


def load_params(path) -> tuple[dict, dict]:
  """Reads a directory written by `save_params`: (tree of numpy arrays, meta)."""
  path = pathlib.Path(path).absolute()
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
