"""The configuration saved in a work directory (`<workdir>/config.json`): written once by the
run that starts the directory, read back typed, older versions migrated, and the check that a
run continuing the directory keeps every field that matters.

Also a config file for `--config`: `--config=dinomaly_jax/config/saved.py:<workdir>` loads
the saved configuration, so that `--config.<field>=value` overrides apply to it with the
types of the defaults (tuples stay tuples, floats floats).
"""
import json

import ml_collections

from dinomaly_jax import storage
from dinomaly_jax.config import defaults
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.errors import IncompatibleWorkdirError

CONFIG_FILE = "config.json"
# The version of config.json's layout (its "schema_version" key; files without one are version 1,
# written before the key existed). Each version's migration fills what it lacked.
SCHEMA_VERSION = 2
SCHEMA_KEY = "schema_version"

# Fields that may differ between the run that wrote a work directory and one that
# continues it: they change neither the parameters' shapes nor the trajectory.
_FREE_FIELDS = ("mode", "encoder_weights", "init_from", "model.attention_impl", "data.root", "data.workers", "data.packed",
                "data.max_image_pixels",
                "data.calibration.folder",
                "train.log_every", "train.eval_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.stop_after", "train.spike_policy", "train.spike_factor",
                "train.spike_window", "train.spike_lr_factor", "train.spike_max_rollbacks", "eval.",
                "predict.", "export.", "compile.")


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


def path_in(workdir: str) -> str:
  return storage.join(workdir, CONFIG_FILE)


def exists_in(workdir: str) -> bool:
  return bool(workdir) and storage.exists(path_in(workdir))


def _migrate(saved: dict) -> dict:
  """A saved config of any version -> the current version's fields (a new dict)."""
  saved = json.loads(json.dumps(saved))
  version = saved.pop(SCHEMA_KEY, 1)
  if version > SCHEMA_VERSION:
    raise ConfigError(f"{CONFIG_FILE}: {SCHEMA_KEY} {version} was written by a newer version of dinomaly_jax "
                      f"(this one reads up to {SCHEMA_VERSION}); update the package.")
  if version < 2:
    saved.setdefault("model", {}).setdefault("family", "dinov2")  # runs before DINOv3 support
    calibration = saved.setdefault("data", {}).setdefault("calibration", {})
    calibration.setdefault("fraction", 0.0)  # runs before the calibration split held nothing out
  return saved


def read(workdir: str) -> dict:
  """The saved configuration of `workdir` as plain JSON, migrated to the current version."""
  path = path_in(workdir)
  try:
    saved = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read the saved configuration ({e}); expected the "
                      "config.json a training run wrote.") from None
  return _migrate(saved)


def load(workdir: str) -> ml_collections.ConfigDict:
  """The saved configuration of `workdir`, every field typed like its default."""
  config = defaults.base_config()
  _merge(config, read(workdir))
  config.mode = defaults.base_config().mode  # the mode is the command line's (--mode), not the saved one
  return config


def save(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The primary process writes config.json atomically; every process returns once it is written."""
  text = json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **json.loads(config.to_json())}, indent=2)
  storage.write_shared(path_in(workdir), text, barrier_name="config.json")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a work directory whose saved config differs in a field that matters."""
  if not exists_in(workdir):
    return
  saved = _flatten(json.loads(load(workdir).to_json()))  # fields added since: their defaults
  now = _flatten(json.loads(config.to_json()))
  diffs = [f"  config.{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
           for k in sorted(set(saved) | set(now))
           if saved.get(k) != now.get(k) and not may_change(k, saved.get(k), now.get(k))]
  if diffs:
    raise IncompatibleWorkdirError(
        f"The work directory {workdir} holds a run with a different configuration "
        f"({path_in(workdir)}):\n" + "\n".join(diffs) +
        f"\nUse a new --workdir (--config.init_from={workdir} there starts from this run's weights if "
        "the model fields are the same), or the same config to resume this run.")


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
