"""The configuration saved in a work directory (`<workdir>/config.json`), read back typed.

Also a config file for `--config`: `--config=dinomaly_jax/config/saved.py:<workdir>` loads
the saved configuration, so that `--config.<field>=value` overrides apply to it with the
types of the defaults (tuples stay tuples, floats floats).
"""
import json

from etils import epath
import ml_collections

from dinomaly_jax.config import defaults
from dinomaly_jax.errors import ConfigError

CONFIG_FILE = "config.json"

# Fields that may differ between the run that wrote a work directory and one that
# continues it: they change neither the parameters' shapes nor the trajectory.
_FREE_FIELDS = ("mode", "encoder_weights", "init_from", "model.attention_impl", "data.root", "data.workers", "data.packed",
                "data.calibration.folder",
                "train.log_every", "train.eval_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.stop_after", "train.spike_policy", "train.spike_factor",
                "train.spike_window", "train.spike_lr_factor", "train.spike_max_rollbacks", "eval.",
                "predict.", "export.")


# Fields that may grow: a larger train.steps continues a (finished) run; the learning-rate
# schedule then spans the new number of steps (README, "Train longer").
_GROWING_FIELDS = ("train.steps",)


def is_free_field(field: str) -> bool:
  """Whether `field` ("train.log_every") may change in a work directory that holds a run."""
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in _FREE_FIELDS)


def may_change(field: str, saved_value, new_value) -> bool:
  """Whether `field` may go from its saved value to `new_value` in a work directory that holds a run."""
  if field in _GROWING_FIELDS:
    return isinstance(new_value, int) and isinstance(saved_value, int) and new_value >= saved_value
  return is_free_field(field)


def path_in(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CONFIG_FILE


def exists_in(workdir: str) -> bool:
  return bool(workdir) and path_in(workdir).exists()


def load(workdir: str) -> ml_collections.ConfigDict:
  """The saved configuration of `workdir`, every field typed like its default."""
  path = path_in(workdir)
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read the saved configuration ({e}); expected the "
                      "config.json a training run wrote.") from None
  config = defaults.base_config()
  _merge(config, saved)
  config.mode = defaults.base_config().mode  # the mode is the command line's (--mode), not the saved one
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    default = config.get(key)
    if isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(default, value)
    elif isinstance(default, tuple) and isinstance(value, list):
      config[key] = tuple(value)
    else:
      config[key] = value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  return load(workdir)
