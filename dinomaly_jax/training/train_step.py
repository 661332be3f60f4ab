"""Train state and the jit-compiled, data-parallel Dinomaly train step.

Only the bottleneck and decoder train; the encoder's parameters ride along in the
state, frozen (no gradient, no optimizer state). Step s uses dropout key
fold_in(rng, s), learning rate schedule(s) and hard-mining ratio
p = min(p_final * s / p_steps, p_final), all from the step inside the jitted
function, so a run is reproducible from its seed and resumable from any step.
"""
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from dinomaly_jax import compiler_options
from dinomaly_jax import sharding
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.training import losses
from dinomaly_jax.training.optim import make_optimizer  # make_optimizer: public here too
from dinomaly_jax.training.optim import make_schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken
  params: Any  # {"bottleneck": ..., "decoder": ...}, trained
  encoder_params: Any  # frozen encoder tree (no optimizer state)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key; dropout key of step s = fold_in(rng, s)


def _raw_key(rng) -> jax.Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def create_train_state(model: Dinomaly, config, rng, encoder_params,
                       image_shape: Sequence[int]) -> TrainState:
  """Initial state. image_shape: (H, W, 3) or (B, H, W, 3), fixes the token count.

  encoder_params None initialises a random encoder (demo / tests only).
  """
  height, width = tuple(image_shape)[-3:-1]
  patch = model.encoder.patch_size
  if height % patch or width % patch:
    raise ValueError(f"image size {height}x{width} must be a multiple of the patch size {patch}.")
  grid_hw = (height // patch, width // patch)
  prefix = 0 if model.conv_decoder_kernel > 0 else 1 + model.encoder.num_registers
  init_rng, encoder_rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(_raw_key(rng)), 3)
  tokens = jnp.zeros((1, prefix + grid_hw[0] * grid_hw[1], model.encoder.embed_dim), jnp.float32)
  init_decode = lambda r: model.init({"params": r}, tokens, grid_hw, train=False,
                                     method=Dinomaly.decode)["params"]
  params = jax.jit(init_decode)(init_rng)
  if encoder_params is None:
    images = jnp.zeros((1, height, width, 3), jnp.float32)
    encoder_params = jax.jit(lambda r: model.encoder.init(r, images, [0])["params"])(encoder_rng)
  tx = make_optimizer(config.train)
  return TrainState(step=jnp.zeros([], jnp.int32), params=dict(params),
                    encoder_params=encoder_params, opt_state=tx.init(params),
                    rng=jax.random.key_data(dropout_rng))


def make_train_step(model: Dinomaly, config, mesh, from_features: bool = False):
  """jit-compiled (state, batch) -> (state, metrics); the state argument is donated.

  batch: {"image": (B, H, W, 3)} or, from_features, {"bottleneck_input": (B, N, D),
  "enc_groups": [(B, h, w, D), ...]}, global arrays split on "data" (see
  sharding.global_batch). metrics: loss, p, lr, grad_norm (before clipping).
  """
  tc = config.train
  tx = make_optimizer(tc)
  schedule = make_schedule(tc)

  def loss_fn(params, encoder_params, batch, dropout_rng, step):
    if from_features:
      bottleneck_input, enc_groups = batch["bottleneck_input"], list(batch["enc_groups"])
    else:
      bottleneck_input, enc_groups = model.apply(
          {"params": {"encoder": encoder_params}}, batch["image"], method=Dinomaly.encode)
    grid_hw = enc_groups[0].shape[1:3]
    dec_groups = model.apply({"params": params}, bottleneck_input, grid_hw, train=True,
                             rngs={"dropout": dropout_rng}, method=Dinomaly.decode)
    points = enc_groups[0].shape[0] * grid_hw[0] * grid_hw[1]  # B * h * w
    num_hard = losses.scheduled_num_hard_points(points, step, tc.loss_p_final, tc.loss_p_steps)
    return losses.global_cosine_hm_loss(enc_groups, dec_groups, num_hard=num_hard,
                                        easy_grad_factor=tc.easy_grad_factor)

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.encoder_params, batch,
                                              dropout_rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        "p": losses.hard_mining_p(state.step, tc.loss_p_final, tc.loss_p_steps),
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.data_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler_options.heavy_jit_options())
