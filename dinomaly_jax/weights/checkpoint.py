"""Checkpoints of the trainable state (orbax), resume, and the work-directory config check.

The frozen encoder is not checkpointed: it is reloaded from `config.encoder_weights`
(or re-created from the seed for random-encoder runs), so a checkpoint holds only
the step, bottleneck + decoder parameters, optimizer state and RNG.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from dinomaly_jax.config.saved import CONFIG_FILE
from dinomaly_jax.config.saved import is_free_field
from dinomaly_jax.errors import IncompatibleWorkdirError

CHECKPOINT_DIR = "checkpoints"


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _as_plain(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a work directory whose saved config differs in a field that matters."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flatten(json.load(f))
  saved.setdefault("model.family", "dinov2")  # runs saved before DINOv3 support were DINOv2
  saved.setdefault("data.calibration.fraction", 0.0)  # runs saved before the calibration split
  now = _flatten(_as_plain(config))
  diffs = [f"  config.{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
           for k in sorted(set(saved) | set(now))
           if saved.get(k) != now.get(k) and not is_free_field(k)]
  if diffs:
    raise IncompatibleWorkdirError(
        f"The work directory {workdir} holds a run with a different configuration "
        f"({path}):\n" + "\n".join(diffs) +
        "\nUse a new --workdir, or the same config to resume this run.")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))


def manager(workdir: str, config: ml_collections.ConfigDict, *, read_only=False) -> ocp.CheckpointManager:
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           max_to_keep=None, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves the trainable part of `state` asynchronously."""
  mngr.save(step, args=ocp.args.StandardSave(trainable(state)), force=True)


def restore(mngr: ocp.CheckpointManager, state, step: int | None = None):
  """Restores into the structure, dtypes and shardings of `state` (the latest step by default)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable(state))
  restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  return state.replace(**restored)


def trainable(state) -> dict:
  """The part of a train state a checkpoint holds (the encoder is frozen and not saved)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
