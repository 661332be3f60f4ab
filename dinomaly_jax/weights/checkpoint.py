"""Checkpoints of the trainable state (orbax), resume, and the work-directory config check.

The frozen encoder is not checkpointed: it is reloaded from `config.encoder_weights`
(or re-created from the seed for random-encoder runs), so a checkpoint holds only
the step, bottleneck + decoder parameters, optimizer state and RNG. Its identity is:
a fingerprint of the encoder parameters is stored beside the checkpoints
(encoder.json) and a run that continues or evaluates them with other weights is refused.

Every path goes through `storage` (local or gs:// / s3://); shared files are written
by process 0 atomically and read after a barrier.
"""
import hashlib
import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dinomaly_jax import storage
from dinomaly_jax.config.saved import CONFIG_FILE
from dinomaly_jax.config.saved import is_free_field
from dinomaly_jax.errors import IncompatibleWorkdirError

CHECKPOINT_DIR = "checkpoints"
ENCODER_FILE = "encoder.json"


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


_DINOMALY2_FIELDS = {"model.context_recentering": False, "model.bottleneck_down_dim": 0,
                     "train.lr_schedule": "warm_cosine", "train.bottleneck_first_lr": 0.0,
                     "data.shots": 0, "data.augment": False}


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a work directory whose saved config differs in a field that matters."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    return
  saved = _flatten(json.loads(storage.read_text(path)))
  saved.setdefault("model.family", "dinov2")  # runs saved before DINOv3 support were DINOv2
  saved.setdefault("data.calibration.fraction", 0.0)  # runs saved before the calibration split
  for field, value in _DINOMALY2_FIELDS.items():  # runs saved before the Dinomaly2 switches
    saved.setdefault(field, value)
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
  """Process 0 writes config.json atomically; every process returns once it is written."""
  storage.write_shared(storage.join(workdir, CONFIG_FILE), config.to_json(indent=2), "config.json")


def encoder_fingerprint(encoder_params) -> str:
  """sha256 (16 hex digits) over the encoder parameters' paths, shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(encoder_params))[0]:
    leaf = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()[:16]


def check_encoder(workdir: str, fingerprint: str, source: str) -> None:
  """Refuses encoder weights other than those the work directory's checkpoints were trained with."""
  path = storage.join(workdir, ENCODER_FILE)
  if not storage.exists(path) or not storage.isdir(storage.join(workdir, CHECKPOINT_DIR)):
    return  # no checkpoint yet: any encoder may start the run
  saved = json.loads(storage.read_text(path))
  if saved["fingerprint"] != fingerprint:
    raise IncompatibleWorkdirError(
        f"config.encoder_weights: the checkpoints in {workdir} were trained with the encoder "
        f"{saved['source']} (fingerprint {saved['fingerprint']}), but this run loads "
        f"{source} (fingerprint {fingerprint}); set config.encoder_weights back to "
        f"{saved['source']}, or use a new --workdir.")


def save_encoder(workdir: str, fingerprint: str, source: str) -> None:
  """Records the encoder of this work directory's checkpoints (process 0, atomic, then a barrier)."""
  info = {"fingerprint": fingerprint, "source": source}
  storage.write_shared(storage.join(workdir, ENCODER_FILE), json.dumps(info, indent=2), "encoder.json")


def manager(workdir: str, config: ml_collections.ConfigDict, *, read_only=False) -> ocp.CheckpointManager:
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           max_to_keep=None, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints)
  return ocp.CheckpointManager(storage.absolute(storage.join(workdir, CHECKPOINT_DIR)),
                                options=options)


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
