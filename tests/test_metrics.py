"""The seven metrics against scikit-learn, hand-computed F1 and direct AUPRO definitions."""
import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

from benchmarks.direct_aupro import direct_reference_aupro
from dinomaly_jax.evaluation import aupro
from dinomaly_jax.evaluation import metrics
from dinomaly_jax.evaluation import score_sort


def _ours(scores, labels):
  labels = np.asarray(labels) > 0
  return metrics.ranking_metrics(score_sort.sorted_keys(scores, labels), np.count_nonzero(labels))


def _sklearn(scores, labels):
  scores, labels = np.ravel(scores), np.ravel(labels)
  precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
  f1 = (2 * precision * recall / (precision + recall + 1e-7))[:-1]
  return {"auroc": skm.roc_auc_score(labels, scores), "ap": skm.average_precision_score(labels, scores),
          "f1max": f1.max(), "f1_threshold": thresholds[np.argmax(f1)]}


def _blob_masks(rng, n, size, anomalous):
  """Smoothed-noise blobs: several components per mask, some masks empty."""
  noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 1.5, 1.5))
  masks = noise > 0.35 * noise.std()
  masks[~anomalous] = False
  masks[anomalous.nonzero()[0][:1]] = False  # an anomalous image with an empty mask
  masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region (8-connected)
  masks[0, 0, 1] = masks[0, 1, 0] = False
  return masks


def _maps_for(rng, masks, levels=None):
  maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
  maps = ndimage.gaussian_filter(maps, sigma=(0, 1, 1)).astype(np.float32)
  if levels:  # quantised: many ties
    maps = (np.round(maps * levels) / levels).astype(np.float32)
  return maps


@pytest.mark.parametrize("n,levels,chunk", [(300, 0, 1 << 22), (300, 20, 1 << 22), (5000, 50, 97),
                                            (4096, 0, 64)])
def test_ranking_matches_sklearn(n, levels, chunk, monkeypatch):
  monkeypatch.setattr(score_sort, "CHUNK", chunk)  # small chunks: runs straddle chunk borders
  rng = np.random.default_rng(n + levels)
  labels = rng.random(n) < 0.3
  scores = (rng.standard_normal(n) + labels).astype(np.float32)
  if levels:
    scores = (np.round(scores * levels / 4) / (levels / 4)).astype(np.float32)
  ours, ref = _ours(scores, labels), _sklearn(scores, labels)
  for k in ("auroc", "ap", "f1max"):
    assert abs(ours[k] - ref[k]) < 1e-12, k  # measured <= 3e-16
  assert ours["f1_threshold"] == ref["f1_threshold"]


def test_f1_hand_computed():
  # Thresholds 0.8, 0.4, 0.35, 0.1 -> (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1), (1/2, 1).
  r = _ours(np.float32([0.1, 0.4, 0.35, 0.8]), [0, 0, 1, 1])
  assert r["f1max"] == pytest.approx((4 / 3) / (5 / 3 + 1e-7), abs=1e-15)
  assert r["f1_threshold"] == np.float32(0.35)
  # Ties are one threshold: at 0.5, (P, R) = (2/3, 1).
  r = _ours(np.float32([0.5, 0.5, 0.5, 0.2]), [1, 0, 1, 0])
  assert r["f1max"] == pytest.approx((4 / 3) / (5 / 3 + 1e-7), abs=1e-15)
  assert r["f1_threshold"] == np.float32(0.5)
  # Equal F1 at 0.9 (P=1, R=1/2) and 0.2 (P=1/2, R=1): the lower threshold is kept.
  r = _ours(np.float32([0.9, 0.6, 0.5, 0.2]), [1, 0, 0, 1])
  assert r["f1max"] == pytest.approx(1 / (1.5 + 1e-7), abs=1e-15)
  assert metrics.image_f1_threshold([0.9, 0.6, 0.5, 0.2], [1, 0, 0, 1]) == np.float32(0.2)


def test_negative_zero_ties_with_zero():
  ours = _ours(np.float32([-0.0, 0.0, 0.0, 1.0, -1.0]), [1, 0, 1, 1, 0])
  ref = _sklearn(np.float32([0.0, 0.0, 0.0, 1.0, -1.0]), [1, 0, 1, 1, 0])
  assert ours["auroc"] == pytest.approx(ref["auroc"], abs=1e-15)
  assert ours["f1max"] == pytest.approx(ref["f1max"], abs=1e-15)


def _direct_mvtec_aupro(maps, masks, max_fpr):
  """MVTec-AD's definition: every distinct score a threshold, curve from (0,0) to (1,1)."""
  regions = [(i, region) for i in range(len(masks)) for region in measure.regionprops(measure.label(masks[i]))]
  x, y = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    binary = maps >= t
    x.append(np.logical_and(binary, ~masks).sum() / (~masks).sum())
    y.append(np.mean([binary[i][tuple(r.coords.T)].mean() for i, r in regions]))
  x, y = np.array(x + [1.0]), np.array(y + [1.0])
  i = int(np.argmax(x > max_fpr))
  y_cut = y[i - 1] + (y[i] - y[i - 1]) * (max_fpr - x[i - 1]) / (x[i] - x[i - 1])
  area = np.sum(np.diff(x[:i]) * (y[1:i] + y[:i - 1]) / 2) + (max_fpr - x[i - 1]) * (y[i - 1] + y_cut) / 2
  return area / max_fpr


@pytest.mark.parametrize("seed,levels,max_fpr", [(0, 0, 0.3), (1, 30, 0.3), (2, 0, 0.1)])
def test_aupro_reference_matches_direct(seed, levels, max_fpr):
  rng = np.random.default_rng(seed)
  anomalous = np.arange(10) >= 4
  masks = _blob_masks(rng, 10, 32, anomalous)
  maps = _maps_for(rng, masks, levels)
  assert aupro.label_regions(masks)[1].size - 1 >= 10  # several regions in the class
  ours = aupro.aupro_reference(maps, masks, max_fpr=max_fpr, num_thresholds=200)
  assert abs(ours - direct_reference_aupro(maps, masks, max_fpr, 200)) < 1e-12  # measured 0.0


def test_aupro_reference_201_thresholds():
  rng = np.random.default_rng(3)
  masks = _blob_masks(rng, 6, 24, np.arange(6) >= 2)
  lo, hi = np.float32(0.31183144), np.float32(0.42332646)  # numpy 1.26 gives 201 thresholds here
  maps = (lo + (hi - lo) * _maps_for(rng, masks) / 2).astype(np.float32)
  maps.reshape(-1)[:2] = lo, hi
  assert aupro.reference_thresholds(maps, 200).size == 201
  ours = aupro.aupro_reference(maps, masks, max_fpr=0.3, num_thresholds=200)
  assert abs(ours - direct_reference_aupro(maps, masks, 0.3, 200)) < 1e-12


@pytest.mark.parametrize("seed,levels,chunk", [(0, 40, 1 << 22), (1, 0, 1 << 22), (2, 25, 53)])
def test_aupro_mvtec_matches_direct(seed, levels, chunk, monkeypatch):
  monkeypatch.setattr(score_sort, "CHUNK", chunk)
  rng = np.random.default_rng(seed)
  masks = _blob_masks(rng, 6, 20, np.arange(6) >= 2)
  maps = _maps_for(rng, masks, levels)
  ours = aupro.aupro_mvtec(maps, masks, max_fpr=0.3)
  assert abs(ours - _direct_mvtec_aupro(maps, masks, 0.3)) < 1e-12  # measured <= 2e-15


def test_class_metrics_matches_sklearn_and_direct():
  rng = np.random.default_rng(7)
  labels = np.arange(12) >= 5
  masks = _blob_masks(rng, 12, 32, labels)
  maps = _maps_for(rng, masks, 50)
  scores = maps.reshape(12, -1).max(axis=1)
  result = metrics.class_metrics(scores, labels, maps, masks.astype(np.uint8) * 255)
  assert tuple(result) == metrics.METRIC_NAMES
  image, pixel = _sklearn(scores, labels), _sklearn(maps, masks)
  expected = (image["auroc"], image["ap"], image["f1max"], pixel["auroc"], pixel["ap"], pixel["f1max"],
              direct_reference_aupro(maps, masks, 0.3, 200))
  np.testing.assert_allclose(list(result.values()), expected, rtol=0, atol=1e-12)
  mvtec = metrics.class_metrics(scores, labels, maps, masks, aupro="mvtec")
  assert abs(mvtec["AUPRO"] - _direct_mvtec_aupro(maps, masks, 0.3)) < 1e-12


def test_all_normal_class_gives_nan_pixel_metrics_with_warning():
  rng = np.random.default_rng(0)
  maps = rng.random((4, 16, 16), dtype=np.float32)
  masks = np.zeros((4, 16, 16), np.uint8)
  with pytest.warns(UserWarning) as record:
    result = metrics.class_metrics(maps.max(axis=(1, 2)), np.zeros(4), maps, masks)
  assert all(np.isnan(result[k]) for k in metrics.METRIC_NAMES)
  assert any("all normal" in str(w.message) for w in record)


def test_anomalous_images_with_empty_masks_keep_image_metrics():
  rng = np.random.default_rng(1)
  maps = rng.random((4, 16, 16), dtype=np.float32)
  labels = np.array([0, 0, 1, 1])
  with warnings.catch_warnings(record=True):
    result = metrics.class_metrics(maps.mean(axis=(1, 2)), labels, maps, np.zeros((4, 16, 16), bool))
  assert result["I-AUROC"] == pytest.approx(skm.roc_auc_score(labels, maps.mean(axis=(1, 2))), abs=1e-12)
  assert np.isnan(result["P-AUROC"]) and np.isnan(result["AUPRO"])


def test_bad_inputs_raise_clear_errors():
  maps = np.zeros((3, 8, 8), np.float32)
  with pytest.raises(ValueError, match="eval.aupro"):
    metrics.class_metrics(np.zeros(3), np.zeros(3), maps, maps, aupro="pro")
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    metrics.class_metrics(np.zeros(3), np.zeros(3), maps, maps[:, :4])
  with pytest.raises(ValueError, match="same length"):
    metrics.image_f1_threshold(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="NaN"):
    metrics.image_f1_threshold([0.1, np.nan], [0, 1])


def test_count_above_matches_numpy_comparison():
  rng = np.random.default_rng(0)
  scores = np.concatenate([np.float32([-0.0, 0.0, -1.5, 2.0]), rng.standard_normal(500).astype(np.float32)])
  scores[10:20] = scores[20]  # ties
  thresholds = np.concatenate([rng.standard_normal(50), scores[:30].astype(np.float64),  # equal to scores
                               np.nextafter(scores[:30].astype(np.float64), np.inf),  # just above
                               np.nextafter(scores[:30].astype(np.float64), -np.inf), [0.0, -0.0]])
  expected = [(scores > t).sum() for t in thresholds]
  np.testing.assert_array_equal(score_sort.count_above(score_sort.sorted_keys(scores), thresholds), expected)


def test_class_metrics_returns_the_f1_optimal_thresholds():
  rng = np.random.default_rng(3)
  labels = np.array([0, 0, 1, 1, 1])
  masks = np.zeros((5, 8, 8), bool)
  masks[2:, 2:5, 2:5] = True
  maps = rng.random((5, 8, 8)).astype(np.float32) + masks
  scores = maps.max(axis=(1, 2))
  result, best = metrics.class_metrics(scores, labels, maps, masks, with_thresholds=True)
  assert best["image"] == metrics.image_f1_threshold(scores, labels)
  # The pixel threshold reaches P-F1max when used as `map >= threshold`.
  predicted = maps >= best["pixel"]
  tp = np.sum(predicted & masks)
  precision, recall = tp / predicted.sum(), tp / masks.sum()
  assert 2 * precision * recall / (precision + recall + 1e-7) == pytest.approx(result["P-F1max"], abs=1e-9)
