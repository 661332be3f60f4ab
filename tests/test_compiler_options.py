"""The CPU compiler options: accepted by this jaxlib, taking products off YNNPACK, and
left alone when the user's XLA_FLAGS choose the YNNPACK fusions."""
import jax
import jax.numpy as jnp
import numpy as np

from dinomaly_jax import compiler_options


def _ynn_fusions(options) -> int:
  x = jnp.ones((512, 512), jnp.float32)
  compiled = jax.jit(lambda a: a @ a, compiler_options=options).lower(x).compile()
  return compiled.as_text().count('"kind":"__ynn_fusion"')


def test_cpu_options_move_products_to_eigen(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  compiler_options.options_for.cache_clear()
  options = compiler_options.heavy_jit_options()
  assert options == compiler_options.CPU_OPTIONS
  assert _ynn_fusions(None) == 1  # XLA's default: the product on YNNPACK
  assert _ynn_fusions(options) == 0  # ours sends it to Eigen
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)), jnp.float32)
  f = lambda a: jnp.tanh(a @ a.T).sum(axis=-1)
  np.testing.assert_allclose(jax.jit(f, compiler_options=options)(x), jax.jit(f)(x), rtol=1e-5)


def test_user_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  compiler_options.options_for.cache_clear()
  try:
    assert compiler_options.heavy_jit_options() is None
  finally:
    compiler_options.options_for.cache_clear()
