"""The JAX functions the benchmarks time: encoder, inference, train steps."""
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dinomaly_jax import compiler_options
from dinomaly_jax import sharding
from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.config.defaults import set_vit
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.models import dinomaly
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import train_step


def make_config(vit: str, size: int, batch: int, dtype: str = "float32",
                attention_impl: str = "auto") -> ml_collections.ConfigDict:
  config = base_config()
  set_vit(config, vit)
  config.model.dtype = dtype
  config.model.attention_impl = attention_impl
  config.data.crop = size
  config.data.resize = size * 8 // 7  # the protocol's 448 -> 392 ratio
  config.train.batch_size = batch
  config.random_encoder = True
  return config


class JaxDinomaly:
  """A model with random weights and its jitted functions; `compile_*` return (fn, seconds)."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.size = config.data.crop
    self.mesh = mesh or sharding.make_mesh()
    self.model = dinomaly.build_model(config.model)
    state = train_step.create_train_state(self.model, config, jax.random.key(config.seed), None,
                                          (self.size, self.size, 3))
    self.state = sharding.replicate(state, self.mesh)

  def images(self, batch: int, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((batch, self.size, self.size, 3), np.float32)
    return sharding.global_batch({"image": x}, self.mesh, "train.batch_size")["image"]

  def compile_encoder(self, images):
    """images -> the target layers' outputs, list of (B, N, D)."""
    encoder, layers = self.model.encoder, list(self.model.target_layers)
    fn = jax.jit(lambda p, x: encoder.apply({"params": p}, x, layers),
                 compiler_options=compiler_options.heavy_jit_options())
    return _compiled(fn, self.state.encoder_params, images)

  def compile_inference(self, images):
    """images -> (anomaly maps (B, 256, 256), image scores (B,)): evaluation's own function."""
    return _compiled(evaluate.make_map_fn(self.model, self.config), self.variables(), images)

  def variables(self):
    """The model's variables as evaluation takes them."""
    return {"params": {"encoder": self.state.encoder_params, **self.state.params}}

  def compile_train_step(self, batch, from_features: bool = False):
    """(state, batch) -> (state, metrics), state donated."""
    step = train_step.make_train_step(self.model, self.config, self.mesh, from_features)
    return _compiled(step, self.fresh_state(), batch)

  def fresh_state(self):
    return jax.tree.map(jnp.copy, self.state)

  def cached_features(self, images):
    """The cached-feature batch for `images`, stored and cast as feature_cache does."""
    bottleneck_input, enc_groups = jax.jit(
        lambda p, x: self.model.apply({"params": {"encoder": p}}, x,
                                      method=dinomaly.Dinomaly.encode))(
                                          self.state.encoder_params, images)
    dtype = feature_cache.cache_dtype(self.config.data.cache_dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype),
                        {"bottleneck_input": bottleneck_input, "enc_groups": enc_groups})


def _compiled(jitted, *args):
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start
