"""Builds the model and its state for a config, fresh or restored from a work directory."""
import jax
import ml_collections

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.config import saved
from dinomaly_jax.errors import IncompatibleWorkdirError
from dinomaly_jax.models import dinomaly
from dinomaly_jax.training import train_step
from dinomaly_jax.weights import checkpoint
from dinomaly_jax.weights import encoder_weights


def build(config: ml_collections.ConfigDict):
  """(model, initial train state, whether the weights held a trained bottleneck + decoder).

  The encoder is loaded; bottleneck and decoder are initialised, or taken from a
  converted trained reference (ViTill) checkpoint in config.encoder_weights.
  """
  encoder_weights.resolve_architecture(config)  # "auto" size / registers (a no-op once resolved)
  model = dinomaly.build_model(config.model)
  image_hw = (config.data.crop, config.data.crop)
  pretrained = encoder_weights.load_pretrained(config)
  state = train_step.create_train_state(
      model, config, jax.random.key(config.seed), pretrained["encoder"], (*image_hw, 3))
  if "decoder" in pretrained:  # a converted, trained reference (ViTill) checkpoint
    state = state.replace(params={k: pretrained[k] for k in ("bottleneck", "decoder")})
  return model, state, "decoder" in pretrained


def encoder_source(config: ml_collections.ConfigDict) -> str:
  """What the encoder was loaded from, in words (named when a resume is refused)."""
  return f"random (seed {config.seed})" if config.random_encoder else config.encoder_weights


def check_encoder(config: ml_collections.ConfigDict, workdir: str, state) -> str:
  """Refuses an encoder other than the one the work directory was trained with; its fingerprint."""
  fingerprint = checkpoint.encoder_fingerprint(state.encoder_params)
  checkpoint.check_encoder(workdir, fingerprint, encoder_source(config))
  return fingerprint


# Model fields that do not shape the trained parameters: a run may start from weights trained with others.
_INIT_FROM_FREE = ("attention_impl", "dtype", "bottleneck_dropout")


def init_from(config: ml_collections.ConfigDict, state, fingerprint: str):
  """(`state` with the bottleneck + decoder of config.init_from's latest checkpoint, its step).

  The optimizer state, step and learning-rate schedule stay those of the new run. The
  trained run must have the same model fields (but those in _INIT_FROM_FREE) and encoder.
  """
  source = config.init_from
  if not saved.exists_in(source) or not storage.isdir(storage.join(source, checkpoint.CHECKPOINT_DIR)):
    raise IncompatibleWorkdirError(f"config.init_from: {source} holds no trained run (no {saved.CONFIG_FILE} "
                                   "and checkpoints); expected the work directory of a training run.")
  trained = saved.load(source).model
  diffs = [f"model.{k}={trained[k]!r}, this run {v!r}" for k, v in config.model.items()
           if k not in _INIT_FROM_FREE and _as_list(trained[k]) != _as_list(v)]
  if diffs:
    raise IncompatibleWorkdirError(f"config.init_from: {source} was trained with {'; '.join(diffs)}; "
                                   "starting from its weights needs the same model fields.")
  checkpoint.check_encoder(source, fingerprint, encoder_source(config))
  params, step = checkpoint.restore_params(source, state.params)
  return state.replace(params=params), step


def _as_list(v):
  """Tuples and lists compare equal (config.json stores lists)."""
  return [_as_list(x) for x in v] if isinstance(v, (list, tuple)) else v


def variables(state) -> dict:
  """The Dinomaly module's variables: frozen encoder + trained bottleneck and decoder."""
  return {"params": {"encoder": state.encoder_params, **state.params}}


def load_trained(config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None = None):
  """The model and the state of the latest (or given) checkpoint in `workdir`.

  Without a checkpoint, a converted trained reference (ViTill) checkpoint named by
  config.encoder_weights is used as it is.
  """
  saved.check_compatible(workdir, config)
  model, state, trained = build(config)
  check_encoder(config, workdir, state)
  state = sharding.replicate(state, mesh)
  if not storage.isdir(storage.join(workdir, checkpoint.CHECKPOINT_DIR)):
    if trained:
      return model, state
    raise FileNotFoundError(
        f"No checkpoint in {workdir}: train there first (--mode=train), or set "
        "config.encoder_weights to a converted trained Dinomaly (ViTill) checkpoint.")
  mngr = checkpoint.manager(workdir, config, read_only=True)
  try:
    state = checkpoint.restore(mngr, state, step)
  finally:
    mngr.close()
  return model, state

