"""Loose loss: value, custom gradient on easy/hard points, p schedule."""
import jax
import numpy as np
import pytest
import torch

from dinomaly_jax.training import losses

B, H, W, D = 3, 5, 4, 8


def _groups(seed, n=2):
  rng = np.random.default_rng(seed)
  enc = [rng.standard_normal((B, H, W, D)).astype(np.float32) for _ in range(n)]
  dec = [(e + 0.7 * rng.standard_normal(e.shape)).astype(np.float32) for e in enc]
  return enc, dec


def _torch_plain_loss_and_grad(enc, dec):
  dec_t = [torch.tensor(d, requires_grad=True) for d in dec]
  loss = sum(torch.mean(1 - torch.nn.functional.cosine_similarity(
      torch.tensor(e).reshape(B, -1), d.reshape(B, -1))) for e, d in zip(enc, dec_t)) / len(enc)
  loss.backward()
  return loss.item(), [d.grad.numpy() for d in dec_t]


def _easy_mask(enc, dec, p):
  """Points whose per-point distance is below the k-th largest, k = int(n * (1 - p))."""
  masks = []
  for e, d in zip(enc, dec):
    cos = torch.nn.functional.cosine_similarity(torch.tensor(e), torch.tensor(d), dim=-1).numpy()
    dist = 1 - cos
    k = int(dist.size * (1 - p))
    thresh = np.sort(dist.reshape(-1))[::-1][k - 1]
    masks.append(dist < thresh)
  return masks


def test_plain_loss_matches_torch_cosine_similarity():
  enc, dec = _groups(0)
  ref_loss, ref_grads = _torch_plain_loss_and_grad(enc, dec)
  loss, grads = jax.value_and_grad(lambda d: losses.global_cosine_loss(enc, d))(dec)
  np.testing.assert_allclose(float(loss), ref_loss, atol=1e-6)  # measured 1.5e-8
  for g, r in zip(grads, ref_grads):  # measured max abs diff 7e-10 (|g| ~ 1e-3)
    np.testing.assert_allclose(np.asarray(g), r, atol=1e-8, rtol=0)


@pytest.mark.parametrize("p", [0.9, 0.45, 0.3])
def test_hard_mining_scales_easy_gradients_only(p):
  enc, dec = _groups(1)
  plain_loss, plain_grads = jax.value_and_grad(lambda d: losses.global_cosine_loss(enc, d))(dec)
  hm_loss, hm_grads = jax.value_and_grad(
      lambda d: losses.global_cosine_hm_loss(enc, d, p, easy_grad_factor=0.1))(dec)
  assert float(hm_loss) == float(plain_loss)
  for g_hm, g_plain, easy in zip(hm_grads, plain_grads, _easy_mask(enc, dec, p)):
    g_hm, g_plain = np.asarray(g_hm), np.asarray(g_plain)
    assert (~easy).sum() == int(B * H * W * (1 - p))  # the hardest k keep the full gradient
    np.testing.assert_array_equal(g_hm[~easy], g_plain[~easy])
    np.testing.assert_allclose(g_hm[easy], 0.1 * g_plain[easy], rtol=1e-6, atol=0)
    assert np.abs(g_plain[easy]).max() > 1e-4


def test_p_zero_equals_plain_loss():
  enc, dec = _groups(2)
  plain = jax.value_and_grad(lambda d: losses.global_cosine_loss(enc, d))(dec)
  hm = jax.value_and_grad(lambda d: losses.global_cosine_hm_loss(enc, d, 0.0))(dec)
  assert float(hm[0]) == float(plain[0])
  for a, b in zip(hm[1], plain[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_encoder_side_gets_no_gradient():
  enc, dec = _groups(3)
  grads = jax.grad(lambda e: losses.global_cosine_hm_loss(e, dec, 0.9))(enc)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_scheduled_hard_points_match_python_at_every_step():
  # n = 60: n * (1 - 0.9) is 5.999... in float64, so int() gives 5; float32 would give 6.
  n = B * H * W
  steps = np.arange(0, 1101)
  got = np.asarray(jax.jit(lambda s: losses.scheduled_num_hard_points(n, s, 0.9, 1000))(steps))
  expected = [max(int(n * (1 - min(0.9 * s / 1000, 0.9))), 1) for s in steps]
  np.testing.assert_array_equal(got, expected)
  assert got[-1] == 5


def test_traced_step_inside_jit():
  enc, dec = _groups(4)
  n = B * H * W
  grad_at_step = jax.jit(lambda d, step: jax.grad(lambda x: losses.global_cosine_hm_loss(
      enc, x, num_hard=losses.scheduled_num_hard_points(n, step, 0.9, 1000)))(d))
  eager = jax.grad(lambda x: losses.global_cosine_hm_loss(enc, x, 0.45))(dec)
  for a, b in zip(grad_at_step(dec, 500), eager):  # measured max abs diff 3e-10 (|g| <= 2e-3)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-8)


def test_p_schedule():
  values = [float(losses.hard_mining_p(s, 0.9, 1000)) for s in (0, 1, 500, 1000, 5000)]
  np.testing.assert_allclose(values, [0.0, 0.0009, 0.45, 0.9, 0.9], rtol=1e-6)


def test_mismatched_groups_raise():
  enc, dec = _groups(5)
  with pytest.raises(ValueError, match="as many encoder as decoder groups"):
    losses.global_cosine_hm_loss(enc, dec[:1], 0.5)
  with pytest.raises(ValueError, match="exactly one of p and num_hard"):
    losses.global_cosine_hm_loss(enc, dec)
  with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
    losses.global_cosine_loss(enc, [d[:, :2] for d in dec])
