r"""Packs a dataset into a TFDS array_record dataset for pods (see packed.py).

  python -m dinomaly_jax.data.pack --config=configs/mvtec.py \
      --config.data.root=/data/mvtec --out=/data/mvtec_packed
  python -m dinomaly_jax.data.pack --layout=visa --root=/data/VisA_pytorch/1cls --out=DIR

Then train with --config.data.packed=DIR (data.root is not read).
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dinomaly_jax.config import defaults
from dinomaly_jax.data import index
from dinomaly_jax.data import packed
from dinomaly_jax.errors import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).")
_LAYOUT = flags.DEFINE_string("layout", None, "Dataset layout, without --config.")
_ROOT = flags.DEFINE_string("root", None, "Dataset root folder, without --config.")
_OUT = flags.DEFINE_string("out", None, "Output folder of the packed dataset.", required=True)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count(), "Encoding processes (0 = none).")


def main(argv) -> None:
  del argv
  config = _CONFIG.value or defaults.base_config()
  if _LAYOUT.value:
    config.data.layout = _LAYOUT.value
  if _ROOT.value:
    config.data.root = _ROOT.value
  config.data.packed = ""
  config.data.calibration.fraction = 0.0  # the pack holds all of train/good; the split is made when reading
  try:
    records = {s: index.build_records(config.data, s) for s in packed.SPLITS}
    packed.write(records, _OUT.value, config.data.resize, _WORKERS.value,
                 description=f"{config.data.layout} dataset from {config.data.root}")
  except DataError as e:
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(1)
  n = {s: len(r) for s, r in records.items()}
  print(f"Packed {n} images at {config.data.resize}px into {_OUT.value}; train with "
        f"--config.data.packed={_OUT.value}")


if __name__ == "__main__":
  app.run(main)
