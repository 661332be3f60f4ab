"""Every attention implementation equals the plain softmax formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinomaly_jax.models import attention


def _reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v in float64 numpy; (B, N, H, D) layout."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1]**-0.5
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(shape, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [(2.0 * jax.random.normal(key, shape)).astype(dtype) for key in keys]


@pytest.mark.parametrize("impl", ["auto", "xla", "blocked"])
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 5, 1, 8), (3, 130, 2, 32)])
def test_float32_matches_formula(impl, shape):
  q, k, v = _qkv(shape)
  out = jax.jit(lambda *a: attention.dot_product_attention(*a, impl=impl))(q, k, v)
  assert out.shape == shape and out.dtype == jnp.float32
  # Measured max abs error vs float64: <= 4.7e-6 (xla), <= 3.9e-6 (blocked).
  np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-5, rtol=0)


def test_blocked_groups_many_pairs_per_step():
  # 300 (batch, head) pairs of tiny logits all fit in one loop step, with a remainder.
  q, k, v = _qkv((25, 9, 12, 8), seed=1)
  out = attention.dot_product_attention(q, k, v, impl="blocked")
  np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-5, rtol=0)


def test_blocked_bfloat16_close_to_formula():
  q, k, v = _qkv((2, 40, 3, 16), jnp.bfloat16, seed=2)
  out = attention.dot_product_attention(q, k, v, impl="blocked")
  assert out.dtype == jnp.bfloat16
  # bfloat16 inputs and weights: measured max abs error 1.5e-2 (xla path: 2.3e-2).
  np.testing.assert_allclose(np.float32(out), _reference(q, k, v), atol=4e-2, rtol=0)


def test_blocked_gradient_matches_xla():
  q, k, v = _qkv((2, 20, 2, 8), seed=3)
  loss = lambda impl: lambda *a: jnp.sum(jnp.sin(attention.dot_product_attention(*a, impl=impl)))
  grads_blocked = jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k, v)
  grads_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g_b, g_x in zip(grads_blocked, grads_xla):
    np.testing.assert_allclose(g_b, g_x, atol=1e-5, rtol=0)


def test_auto_picks_blocked_on_cpu():
  assert jax.default_backend() == "cpu"
  assert attention._auto_impl(jnp.zeros((1, 2, 1, 8))) == "blocked"  # pylint: disable=protected-access


def test_unknown_impl_is_rejected():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="auto.*xla.*cudnn.*blocked.*'flash'"):
    attention.dot_product_attention(q, q, q, impl="flash")


def test_blocked_exports_with_a_symbolic_batch():
  # ViT-S at 112 (69 tokens, 6 heads): min(6*b, 275) pairs per step cannot be decided for a
  # symbolic b; the export takes 6 (a divisor of the heads) and gives the concrete results.
  q, k, v = _qkv((3, 69, 6, 8), seed=4)
  spec = jax.ShapeDtypeStruct((*jax.export.symbolic_shape("b"), 69, 6, 8), jnp.float32)
  blocked = lambda *a: attention.dot_product_attention(*a, impl="blocked")
  exported = jax.export.export(jax.jit(blocked))(spec, spec, spec)
  np.testing.assert_allclose(exported.call(q, k, v), jax.jit(blocked)(q, k, v), atol=1e-6, rtol=0)
  np.testing.assert_allclose(exported.call(q[:1], k[:1], v[:1]), _reference(q[:1], k[:1], v[:1]),
                             atol=1e-5, rtol=0)
