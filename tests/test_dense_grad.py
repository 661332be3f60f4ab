"""The Dense product with the CPU-friendly weight gradient equals plain autodiff."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinomaly_jax.models import dense_grad


@pytest.mark.parametrize("features_in,features_out", [(8, 24), (24, 8), (16, 16)])
def test_gradients_equal_autodiff(features_in, features_out):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, features_in)), jnp.float32)
  plain = nn.Dense(features_out)
  ours = nn.Dense(features_out, dot_general=dense_grad.dense_dot_general)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, features_out)), jnp.float32)

  def grads(module):
    loss = lambda p, x: jnp.sum(module.apply(p, x) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  (want_params, want_x), (got_params, got_x) = grads(plain), grads(ours)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
  for want, got in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ours.apply(params, x), plain.apply(params, x))


def test_other_contractions_fall_back_to_lax():
  lhs, rhs = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched product: not a Dense layer's
  np.testing.assert_array_equal(dense_grad.dense_dot_general(lhs, rhs, dims),
                                jax.lax.dot_general(lhs, rhs, dims))
