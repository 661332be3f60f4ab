"""Converts PyTorch DINOv2 / DINOv3 / Dinomaly checkpoints into our parameter directory.

  python -m weight_conversion.convert --checkpoint FILE --out DIR
  python -m weight_conversion.convert --download vitb14_reg4 --out DIR

FILE: an official DINOv2 .pth, a Hugging Face Dinov2(WithRegisters)Model
.safetensors/.bin, a timm `vit_*_patch14[_reg4]_dinov2` state dict, an official
DINOv3 ViT .pth, a Hugging Face DINOv3ViTModel .safetensors/.bin, or a trained
Dinomaly (ViTill) state dict. DIR then loads with
`dinomaly_jax.weights.converted.load_encoder(DIR)` (or `load_params` for the full tree).
"""
import argparse
import sys

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.weights import convert
from dinomaly_jax.weights import converted
from weight_conversion import download


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
      tree, meta = convert.convert_file(path, expect_vit=vit, expect_registers=registers,
                                expect_pos_grid=download.OFFICIAL_POS_GRID)
    else:
      tree, meta = convert.convert_file(args.checkpoint)
    out = converted.save_params(args.out, tree, meta)
  except (CheckpointError, download.DownloadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {meta['family']} {meta['vit']} encoder ({meta['registers']} registers, "
        f"{meta['source_format']} format) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
