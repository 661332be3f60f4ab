"""Builds the model and its state for a config, fresh or restored from a work directory."""
import jax
import ml_collections

from dinomaly_jax import checkpoint
from dinomaly_jax import encoder_weights
from dinomaly_jax import sharding
from dinomaly_jax import train_step
from dinomaly_jax.models import dinomaly


def build(config: ml_collections.ConfigDict):
  """The model and its initial train state (encoder loaded, the rest initialised)."""
  model = dinomaly.build_model(config.model)
  image_hw = (config.data.crop, config.data.crop)
  enc_params = encoder_weights.load_encoder_params(config, model.encoder, image_hw)
  state = train_step.create_train_state(
      model, config, jax.random.key(config.seed), enc_params, (*image_hw, 3))
  return model, state


def load_trained(config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None = None):
  """The model and the state of the latest (or given) checkpoint in `workdir`."""
  checkpoint.check_compatible(workdir, config)
  model, state = build(config)
  state = jax.device_put(state, sharding.replicated(mesh))
  mngr = checkpoint.manager(workdir, config, read_only=True)
  try:
    state = checkpoint.restore(mngr, state, step)
  finally:
    mngr.close()
  return model, state
