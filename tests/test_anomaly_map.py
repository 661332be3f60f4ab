"""Anomaly maps and image scores against torch.nn.functional (interpolate, conv2d, cosine)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomaly_jax.evaluation import anomaly_map


def _torch_gaussian(maps, size, sigma):
  """The protocol's kernel from its definition: 2-d exp(-r^2 / 2 sigma^2) / sum, zero padding."""
  coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
  yy, xx = torch.meshgrid(coords, coords, indexing="ij")
  kernel = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
  kernel = (kernel / kernel.sum())[None, None]
  return F.conv2d(maps, kernel, padding=size // 2)


def _torch_pipeline(enc, dec, input_size, map_size, gaussian_size, sigma):
  """Protocol steps with torch ops on (B, D, h, w) tensors."""
  per_group = []
  for e, d in zip(enc, dec):
    dist = 1 - F.cosine_similarity(e, d)[:, None]
    per_group.append(F.interpolate(dist, size=input_size, mode="bilinear", align_corners=True))
  amap = torch.cat(per_group, dim=1).mean(dim=1, keepdim=True)
  amap = F.interpolate(amap, size=map_size, mode="bilinear", align_corners=False)
  return _torch_gaussian(amap, gaussian_size, sigma)[:, 0]


@pytest.mark.parametrize("out_size,in_size,align", [(392, 28, True), (256, 392, False), (10, 7, False),
                                                    (7, 10, False), (9, 4, True), (1, 5, False)])
def test_resize_matrix_matches_torch(out_size, in_size, align):
  x = torch.randn(3, 1, in_size, 2, generator=torch.Generator().manual_seed(out_size))
  expected = F.interpolate(x, size=(out_size, 2), mode="bilinear", align_corners=align)
  ours = np.einsum("oi,bcij->bcoj", anomaly_map.resize_matrix(out_size, in_size, align), x.numpy())
  np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-6)  # measured <= 2.5e-7


def test_gaussian_matches_conv2d_with_zero_padding():
  x = torch.rand(2, 1, 33, 33, generator=torch.Generator().manual_seed(0))
  g = anomaly_map.gaussian_matrix(33, 5, 4.0)
  ours = np.einsum("sh,bchw,tw->bcst", g, x.numpy(), g)
  np.testing.assert_allclose(ours, _torch_gaussian(x, 5, 4.0).numpy(), rtol=0, atol=1e-6)  # measured 1.4e-7


@pytest.mark.parametrize("feature,input_size,map_size", [(4, 56, 32), (3, 42, 48), (28, 392, 256)])
def test_anomaly_map_matches_torch_pipeline(feature, input_size, map_size):
  rng = np.random.default_rng(feature)
  enc = [rng.standard_normal((2, feature, feature, 16)).astype(np.float32) for _ in range(2)]
  dec = [e + 0.7 * rng.standard_normal(e.shape).astype(np.float32) for e in enc]
  fn = jax.jit(lambda e, d: anomaly_map.anomaly_map(e, d, (input_size, input_size), map_size=map_size))
  ours = np.asarray(fn(enc, dec))
  to_nchw = lambda xs: [torch.from_numpy(x).permute(0, 3, 1, 2) for x in xs]
  expected = _torch_pipeline(to_nchw(enc), to_nchw(dec), input_size, map_size, 5, 4.0).numpy()
  assert ours.shape == (2, map_size, map_size) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)  # measured <= 2.1e-7


def test_image_score_is_mean_of_reference_top_k():
  maps = jax.random.uniform(jax.random.key(0), (3, 256, 256))
  assert anomaly_map.top_k((256, 256), 0.01) == 655
  flat = torch.from_numpy(np.array(maps)).flatten(1)
  expected = torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * 0.01)].mean(dim=1)
  np.testing.assert_allclose(anomaly_map.image_score(maps, 0.01), expected.numpy(), rtol=1e-6)
  np.testing.assert_array_equal(anomaly_map.image_score(maps, 0.0), flat.max(dim=1)[0].numpy())


def test_export_with_symbolic_batch():
  enc = [jax.ShapeDtypeStruct((*jax.export.symbolic_shape("b"), 4, 4, 8), jnp.float32)] * 2

  def fn(e, d):
    maps = anomaly_map.anomaly_map(e, d, (56, 56), map_size=32)
    return maps, anomaly_map.image_score(maps)

  exported = jax.export.export(jax.jit(fn))(enc, enc)
  x = [np.random.default_rng(i).standard_normal((3, 4, 4, 8)).astype(np.float32) for i in range(4)]
  maps, scores = exported.call(x[:2], x[2:])
  np.testing.assert_allclose(maps, fn(x[:2], x[2:])[0], rtol=0, atol=1e-6)  # measured 2.4e-7
  assert scores.shape == (3,)


def test_full_resolution_map():
  maps = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
  np.testing.assert_array_equal(anomaly_map.full_resolution_map(maps, (16, 16)), maps)
  data = ml_collections.ConfigDict({"resize": 64, "crop": 48})
  full = anomaly_map.full_resolution_map(np.full((1, 16, 16), 2.0, np.float32), (100, 80), data)
  assert full.shape == (1, 100, 80)
  # The 48-pixel crop starts 8 pixels into the 64-pixel resize: its edges fall on the centres
  # of rows 12 and 87 (x 0.64 = 8 and 56) and of columns 10 and 69 (x 0.8 = 8 and 56).
  rows, cols = np.nonzero(full[0, :, 40])[0], np.nonzero(full[0, 50])[0]
  assert (rows[0], rows[-1], cols[0], cols[-1]) == (12, 87, 10, 69)
  np.testing.assert_allclose(full[0, 12:88, 10:70], 2.0, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="as many encoder as decoder"):
    anomaly_map.anomaly_map([x, x], [x], (56, 56))
  with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
    anomaly_map.anomaly_map([x], [x[..., :4]], (56, 56))
  with pytest.raises(ValueError, match="gaussian_size"):
    anomaly_map.anomaly_map([x], [x], (56, 56), gaussian_size=4)
  with pytest.raises(ValueError, match="top_ratio"):
    anomaly_map.image_score(jnp.zeros((1, 8, 8)), 0.001)
