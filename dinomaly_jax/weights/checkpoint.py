"""Checkpoints of the trainable state (orbax), resume, and the encoder they were trained with.

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
import logging

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dinomaly_jax import storage
from dinomaly_jax.errors import DiskFullError
from dinomaly_jax.errors import IncompatibleWorkdirError

CHECKPOINT_DIR = "checkpoints"
ENCODER_FILE = "encoder.json"


def encoder_fingerprint(encoder_params) -> str:
  """sha256 (16 hex digits) over the encoder parameters' paths, shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(encoder_params))[0]:
    leaf = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()[:16]


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a finished checkpoint: a step folder in checkpoints/ (orbax creates the
  folder itself when its manager is built, and writes a step under a temporary name first)."""
  folder = storage.join(workdir, CHECKPOINT_DIR)
  return storage.isdir(folder) and any(name.isdigit() for name in storage.listdir(folder))


def check_encoder(workdir: str, fingerprint: str, source: str) -> None:
  """Refuses encoder weights other than those the work directory's checkpoints were trained with."""
  path = storage.join(workdir, ENCODER_FILE)
  if not storage.exists(path) or not has_checkpoint(workdir):
    return  # no checkpoint yet: any encoder may start the run
  saved = json.loads(storage.read_text(path))
  if saved["fingerprint"] != fingerprint:
    raise IncompatibleWorkdirError(
        f"config.encoder_weights: the checkpoints in {workdir} were trained with the encoder "
        f"{saved['source']} (fingerprint {saved['fingerprint']}), but this run loads "
        f"{source} (fingerprint {fingerprint}); set config.encoder_weights back to "
        f"{saved['source']}, or use a new --workdir.")


def save_encoder(workdir: str, fingerprint: str, source: str) -> None:
  """Records the encoder of this work directory's checkpoints (primary process, atomic, then a barrier)."""
  info = {"fingerprint": fingerprint, "source": source}
  storage.write_shared(storage.join(workdir, ENCODER_FILE), json.dumps(info, indent=2),
                       barrier_name="encoder.json")


def manager(workdir: str, config: ml_collections.ConfigDict, *, read_only=False) -> ocp.CheckpointManager:
  if read_only:
    return _read_only_manager(workdir)
  return ocp.CheckpointManager(storage.absolute(storage.join(workdir, CHECKPOINT_DIR)),
                                options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints))


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads; orbax's warning that its directory is read only (it is, on
  purpose) is not shown."""
  quiet = lambda record: not record.getMessage().startswith("Given directory is read only")
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    return ocp.CheckpointManager(storage.absolute(storage.join(workdir, CHECKPOINT_DIR)),
                                 options=ocp.CheckpointManagerOptions(
                                     read_only=True, create=False, save_interval_steps=0,
                                     max_to_keep=None, enable_async_checkpointing=False))
  finally:
    absl_logger.removeFilter(quiet)


def check_room(workdir: str, state, last_step: int) -> None:
  """Refuses to start a checkpoint the disk has no room for (DiskFullError naming the folder):
  a write that fails half-way leaves a temporary folder and a traceback from orbax's
  background thread. The primary process's disk decides (one shared answer: no host starts a
  save the others skip); the size is the state's bytes, what orbax writes uncompressed."""
  folder = storage.join(workdir, CHECKPOINT_DIR)
  needed = sum(leaf.nbytes for leaf in jax.tree.leaves(trainable(state)))
  free = storage.free_bytes(folder)
  if storage.primary_decides(free is None or free >= needed):
    return
  kept = f"the checkpoint of step {last_step} is intact" if last_step else "no checkpoint was written yet"
  raise DiskFullError(
      f"{folder}: the disk is full: a checkpoint needs {needed / 2**20:.0f} MiB, "
      f"{(free or 0) / 2**20:.0f} MiB are free; {kept}. Free some space and run again to resume: "
      f"python -m dinomaly_jax.main --workdir={workdir}")


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


def restore_params(workdir: str, params):
  """(bottleneck + decoder parameters of the latest checkpoint of `workdir`, its step), in the
  structure, dtypes and shardings of `params` (the optimizer state is not read)."""
  mngr = _read_only_manager(workdir)
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  finally:
    mngr.close()
  return restored["params"], step


def trainable(state) -> dict:
  """The part of a train state a checkpoint holds (the encoder is frozen and not saved)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
