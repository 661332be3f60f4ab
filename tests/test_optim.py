"""StableAdamW, warm-cosine schedule and torch-style clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimi
import torch

from dinomaly_jax.training import optim

SHAPES = {"w": (6, 5), "b": (5,)}


def _grad_sequence(seed, steps, scales):
  rng = np.random.default_rng(seed)
  return [{k: (rng.standard_normal(s) * scales[t]).astype(np.float32) for k, s in SHAPES.items()}
          for t in range(steps)]


def _params(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _run_ours(params, grads, **kwargs):
  tx = optim.stable_adamw(**kwargs)
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params)


def _run_optimi(params, grads, lr, wd, eps):
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = optimi.StableAdamW(list(tensors.values()), lr=lr, betas=(0.9, 0.999), weight_decay=wd,
                           eps=eps, foreach=False, triton=False)
  for g in grads:
    for k, t in tensors.items():
      t.grad = torch.tensor(g[k])
    opt.step()
  return {k: t.detach().numpy() for k, t in tensors.items()}


def _run_formula(params, grads, lr, wd, eps, amsgrad, b1=0.9, b2=0.999):
  """The reference StableAdamW written out in float64 numpy; also returns the RMS values."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  vmax = {k: np.zeros_like(x) for k, x in params.items()}
  rms_seen = []
  for t, g in enumerate(grads, start=1):
    for k in params:
      gk = g[k].astype(np.float64)
      params[k] = params[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      vmax[k] = np.maximum(vmax[k], v[k])
      second = vmax[k] if amsgrad else v[k]
      denom = np.sqrt(second) / np.sqrt(1 - b2 ** t) + eps
      rms = np.sqrt(np.mean((gk / denom) ** 2))
      rms_seen.append(rms)
      params[k] = params[k] - lr / (1 - b1 ** t) / max(1.0, rms) * m[k] / denom
  return params, np.array(rms_seen)


def test_matches_optimi_with_rms_clipping_and_no_weight_decay():
  # Spikes make RMS(g / denom) exceed 1, so the update clip is exercised.
  grads = _grad_sequence(0, 6, [1.0, 1.0, 20.0, 0.5, 30.0, 1.0])
  params = _params(1)
  ours = _run_ours(params, grads, learning_rate=1e-2, eps=1e-10, weight_decay=0.0)
  ref = _run_optimi(params, grads, lr=1e-2, wd=0.0, eps=1e-10)
  _, rms = _run_formula(params, grads, 1e-2, 0.0, 1e-10, amsgrad=False)
  assert rms.max() > 1.2
  for k in SHAPES:  # measured max abs diff 2.4e-7 (a few float32 ulps at |p| ~ 2)
    np.testing.assert_allclose(ours[k], ref[k], atol=2e-6, rtol=0)


def test_matches_optimi_with_weight_decay_when_unclipped():
  # Shrinking gradients keep RMS(g / denom) <= 1, where optimi's weight decay equals ours.
  grads = _grad_sequence(2, 6, [0.5 ** t for t in range(6)])
  params = _params(3)
  ours = _run_ours(params, grads, learning_rate=1e-2, eps=1e-10, weight_decay=0.5)
  ref = _run_optimi(params, grads, lr=1e-2, wd=0.5, eps=1e-10)
  _, rms = _run_formula(params, grads, 1e-2, 0.5, 1e-10, amsgrad=False)
  assert rms.max() <= 1.0 + 1e-6
  for k in SHAPES:  # measured max abs diff 7.2e-7 (a few float32 ulps at |p| ~ 2)
    np.testing.assert_allclose(ours[k], ref[k], atol=2e-6, rtol=0)


def test_amsgrad_clip_and_decay_match_written_formula():
  # Large then small gradients: v falls below its running max, so AMSGrad matters.
  grads = _grad_sequence(4, 8, [5.0, 40.0, 1.0, 0.1, 0.1, 3.0, 0.05, 0.05])
  params = _params(5)
  # b2 = 0.9 so that v forgets quickly and its running max differs from it.
  ours = _run_ours(params, grads, learning_rate=2e-3, b2=0.9, eps=1e-10, weight_decay=1e-1,
                   amsgrad=True)
  ref, rms = _run_formula(params, grads, 2e-3, 1e-1, 1e-10, amsgrad=True, b2=0.9)
  no_ams, _ = _run_formula(params, grads, 2e-3, 1e-1, 1e-10, amsgrad=False, b2=0.9)
  assert rms.max() > 1.2
  for k in SHAPES:
    assert np.abs(ref[k] - no_ams[k]).max() > 1e-4
    # measured max abs diff 1.8e-7 (float32 vs float64)
    np.testing.assert_allclose(ours[k], ref[k], atol=1e-6, rtol=0)


def test_schedule_values():
  lr, final, total, warm = 2e-3, 2e-4, 10_000, 100
  expected = np.concatenate([
      np.linspace(0.0, lr, warm),
      final + 0.5 * (lr - final) * (1 + np.cos(np.pi * np.arange(total - warm) / (total - warm)))])
  schedule = optim.warm_cosine_schedule(lr, final, total, warm)
  for step in (0, 1, 50, 99, 100, 101, 5000, total - 1):
    np.testing.assert_allclose(float(schedule(step)), expected[step], rtol=1e-5, atol=1e-12)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(99)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(total)), final, rtol=1e-6)


def test_stable_adamw_uses_schedule_from_step_zero():
  # lr(0) = 0: the first step changes nothing, the second one does.
  tx = optim.stable_adamw(optim.warm_cosine_schedule(1e-2, 1e-3, 10, 3), weight_decay=0.1)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  g = {"w": jnp.array([1.0, -2.0, 3.0])}
  updates, state = tx.update(g, state, params)
  assert np.all(np.asarray(updates["w"]) == 0.0)
  updates, state = tx.update(g, state, params)
  assert np.all(np.abs(np.asarray(updates["w"])) > 1e-4)


def test_clip_matches_torch_clip_grad_norm():
  rng = np.random.default_rng(6)
  grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  tensors = [torch.zeros(s, requires_grad=True) for s in SHAPES.values()]
  for t, k in zip(tensors, SHAPES):
    t.grad = torch.tensor(grads[k])
  torch.nn.utils.clip_grad_norm_(tensors, max_norm=0.1)
  ours, _ = optim.clip_by_global_norm_torch(0.1).update(jax.tree.map(jnp.asarray, grads), None)
  for t, k in zip(tensors, SHAPES):  # measured max abs diff ~1e-9
    np.testing.assert_allclose(np.asarray(ours[k]), t.grad.numpy(), atol=1e-7, rtol=0)
  small = jax.tree.map(lambda g: jnp.asarray(g) * 1e-3, grads)
  unchanged, _ = optim.clip_by_global_norm_torch(0.1).update(small, None)
  for k in SHAPES:
    np.testing.assert_array_equal(np.asarray(unchanged[k]), np.asarray(small[k]))
