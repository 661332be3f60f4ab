r"""Dinomaly-JAX: train, evaluate, predict, export.

  python -m dinomaly_jax.main --config=configs/demo.py --workdir=/tmp/dinomaly_demo
  python -m dinomaly_jax.main --config=configs/visa.py --workdir=runs/visa \
      --config.data.root=/data/VisA_pytorch/1cls --config.encoder_weights=weights/vitb14_reg4
  python -m dinomaly_jax.main --config=configs/visa.py --workdir=runs/visa --mode=eval
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dinomaly_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, reports.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval", "predict", "export"],
                          "Overrides config.mode.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep the libraries' INFO lines off the terminal
  config = _CONFIG.value
  if _MODE.value:
    config.mode = _MODE.value
  try:
    from dinomaly_jax import run  # Imported here: jax and the stages load after the flags parse.
    run.run(config, _WORKDIR.value)
  except errors.USER_ERRORS as e:
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
