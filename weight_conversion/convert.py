"""Converts PyTorch DINOv2 / Dinomaly checkpoints into our parameter directory.

  python -m weight_conversion.convert --checkpoint FILE --out DIR
  python -m weight_conversion.convert --download vitb14_reg4 --out DIR

FILE: an official DINOv2 .pth, a Hugging Face Dinov2(WithRegisters)Model
.safetensors/.bin, a timm `vit_*_patch14[_reg4]_dinov2` state dict, or a
trained Dinomaly (ViTill) state dict. DIR then loads with
`dinomaly_jax.weights.load_encoder(DIR)` (or `load_params` for the full tree).
"""
import argparse
import pathlib
import sys
from typing import Mapping

from dinomaly_jax import weights
from weight_conversion import download
from weight_conversion import mappings
from weight_conversion.mappings import CheckpointError
from weight_conversion.state_dict_io import load_state_dict

_VITILL_PREFIXES = ("bottleneck.", "decoder.")


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
  official, names, source_format, problems = mappings.to_official(state)
  arch = mappings.detect_architecture(official)
  expected = dict(vit=expect_vit, num_registers=expect_registers, pos_grid=expect_pos_grid)
  wrong = [f"{field}={arch[field]!r} (expected {want!r})"
           for field, want in expected.items() if want is not None and arch[field] != want]
  if wrong:
    raise CheckpointError(f"Checkpoint is not the expected architecture: {', '.join(wrong)}.")
  params = mappings.official_to_params(official, mappings.encoder_from_arch(arch), names, problems)
  meta = dict(arch, registers=arch["num_registers"], source_format=source_format)
  return params, meta


def is_vitill_state_dict(state_dict: Mapping) -> bool:
  return any(k.startswith(_VITILL_PREFIXES) for k in state_dict)


def convert_state_dict(state_dict: Mapping, **expect) -> tuple[dict, dict]:
  """Any supported state dict -> (tree to save, meta); `expect` as above."""
  if is_vitill_state_dict(state_dict):
    from weight_conversion import vitill  # Imported lazily: owned by the Dinomaly model work.
    _, meta = convert_dinov2_state_dict(state_dict, prefix="encoder.", **expect)
    return vitill.convert_vitill(state_dict), dict(meta, source_format="dinomaly-vitill")
  params, meta = convert_dinov2_state_dict(state_dict, **expect)
  return {"encoder": params}, meta


def convert_file(path, **expect) -> tuple[dict, dict]:
  """Reads and converts one checkpoint file; errors name the file."""
  state_dict = load_state_dict(path)
  try:
    tree, meta = convert_state_dict(state_dict, **expect)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return tree, dict(meta, source_file=str(pathlib.Path(path).absolute()))


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m weight_conversion.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="PyTorch checkpoint file (.pth/.pt/.bin/.safetensors).")
  source.add_argument("--download", metavar="NAME", choices=sorted(download.OFFICIAL_MODELS),
                      help=f"official DINOv2 model: {', '.join(download.OFFICIAL_MODELS)}.")
  parser.add_argument("--out", required=True, help="output directory for params/ and meta.json.")
  parser.add_argument("--cache-dir", default=str(download.DEFAULT_CACHE_DIR),
                      help="where --download keeps the .pth file (default: %(default)s).")
  parser.add_argument("--base-url", default=None,
                      help=f"mirror of {download.OFFICIAL_BASE_URL} (or set ${download.BASE_URL_ENV}).")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    if args.download:
      path = download.download_official(args.download, args.cache_dir, args.base_url)
      vit, registers = download.OFFICIAL_MODELS[args.download]
      tree, meta = convert_file(path, expect_vit=vit, expect_registers=registers,
                                expect_pos_grid=download.OFFICIAL_POS_GRID)
    else:
      tree, meta = convert_file(args.checkpoint)
    out = weights.save_params(args.out, tree, meta)
  except (CheckpointError, download.DownloadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {meta['vit']} encoder ({meta['registers']} registers, {meta['source_format']} "
        f"format) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
