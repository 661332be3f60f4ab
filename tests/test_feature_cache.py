"""Training from cached encoder features equals training from images."""
import functools

import jax
import numpy as np
from PIL import Image
import pytest

from dinomaly_jax import sharding
from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.data import pipeline
from dinomaly_jax.data.records import Record
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.models.vit import DinoV2Encoder
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import train_step

IMAGE = 42  # 3 x 3 patches
STEPS = 5  # 10 images, batch 4: 2 batches per epoch, so the steps cross two reshuffles
ENCODER = DinoV2Encoder(embed_dim=32, depth=5, num_heads=2, num_registers=4, pos_grid=4)
MODEL = Dinomaly(encoder=ENCODER, target_layers=(1, 2, 3, 4), fuse_groups=((0, 1), (2, 3)),
                 decoder_depth=4)


def _config(cache_dtype="float32"):
  config = base_config()
  config.seed = 3
  config.train.batch_size = 4
  config.train.warmup_steps = 0
  config.data.resize = config.data.crop = IMAGE
  config.data.workers = 0
  config.data.cache_dtype = cache_dtype
  return config


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  result = []
  for i in range(10):
    path = str(root / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (50, 60, 3), np.uint8)).save(path)
    result.append(Record(path, "thing", 0, "good", None))
  return result


@functools.cache
def _encoder_params():
  return ENCODER.init(jax.random.key(7), np.zeros((1, IMAGE, IMAGE, 3), np.float32), [0])["params"]


def _state(config, mesh):
  state = train_step.create_train_state(MODEL, config, jax.random.key(config.seed),
                                        _encoder_params(), (IMAGE, IMAGE, 3))
  return sharding.replicate(state, mesh)


def _train(batches, step_fn, config, mesh):
  state, losses = _state(config, mesh), []
  for _ in range(STEPS):
    state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh, "train.batch_size"))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), np.array(losses)


@functools.cache
def _uncached_run(records):
  config, mesh = _config(), sharding.make_mesh()
  batches = pipeline.train_iterator(list(records), config.data, batch_size=4, seed=config.seed)
  return _train(batches, train_step.make_train_step(MODEL, config, mesh), config, mesh)


def _cached_run(records, cache_dtype):
  config, mesh = _config(cache_dtype), sharding.make_mesh()
  batches, step_fn = feature_cache.cached_training(config, MODEL, _encoder_params(), records, mesh)
  return _train(batches, step_fn, config, mesh)


def test_float32_cache_equals_uncached_training(records, capsys):
  params, losses = _cached_run(records, "float32")
  ref_params, ref_losses = _uncached_run(tuple(records))
  assert "10 images" in capsys.readouterr().out
  # Measured: loss and parameter differences exactly 0 (same float32 ops in the same order).
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params, ref_params)


def test_bfloat16_cache_close_to_uncached_training(records):
  _, losses = _cached_run(records, "bfloat16")
  _, ref_losses = _uncached_run(tuple(records))
  # bfloat16 targets (8 significant bits): measured relative loss difference <= 6e-4.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-3, atol=0)


def test_batches_follow_the_image_pipeline_and_resume():
  cache = {"bottleneck_input": np.arange(10)[:, None], "enc_groups": [np.arange(10) * 2]}
  full = feature_cache.cached_batches(cache, num_images=10, batch_size=3, seed=5)
  first = [next(full) for _ in range(7)]
  assert all(b["rows"]["bottleneck_input"].shape == (3, 1) for b in first)  # one process holds all
  assert all(list(b["positions"]) == [0, 1, 2] for b in first)
  rows = first[4]["rows"]
  np.testing.assert_array_equal(rows["enc_groups"][0], 2 * rows["bottleneck_input"][:, 0])
  epoch = np.concatenate([b["rows"]["bottleneck_input"][:, 0] for b in first[:3]])
  assert len(set(epoch)) == 9  # one epoch: 3 batches, distinct images, remainder dropped
  resumed = next(feature_cache.cached_batches(cache, num_images=10, batch_size=3, seed=5,
                                              start_step=5))
  np.testing.assert_array_equal(resumed["rows"]["bottleneck_input"], first[5]["rows"]["bottleneck_input"])


def _placed(uploads, global_batch):
  """The global batch that make_place builds from the processes' uploads (one device here)."""
  place = feature_cache.make_place(sharding.make_mesh(jax.devices()[:1]), global_batch)
  joined = jax.tree.map(lambda *xs: np.concatenate(xs), *uploads)  # (P*K, ...) in process order
  return jax.tree.map(np.asarray, place(joined))


def test_each_process_uploads_its_rows_and_they_place_into_the_batch():
  n = 11  # global batch 4: 3 batches to encode, the last padded with one blank row
  one = feature_cache.cached_batches({"x": np.arange(n) + 1}, num_images=n, batch_size=4, seed=5)
  held = [feature_cache.owned_rows(n, 2, p, 2) for p in (0, 1)]
  np.testing.assert_array_equal(held[0], [0, 1, 4, 5, 8, 9])
  np.testing.assert_array_equal(held[1], [2, 3, 6, 7, 10, -1])
  two = [feature_cache.cached_batches({"x": np.where(h >= 0, h + 1, 0)}, num_images=n, batch_size=2,
                                      seed=5, process_index=p, process_count=2)
         for p, h in enumerate(held)]
  for _ in range(7):  # across epochs (2 batches each)
    uploads = [next(t) for t in two]
    assert uploads[0]["rows"]["x"].shape == uploads[1]["rows"]["x"].shape  # the same K on every process
    real = np.concatenate([u["positions"][u["positions"] >= 0] for u in uploads])
    assert sorted(real) == [0, 1, 2, 3]  # each row of the batch comes from exactly one process
    batch = next(one)
    np.testing.assert_array_equal(_placed([batch], 4)["x"], batch["rows"]["x"])
    np.testing.assert_array_equal(_placed(uploads, 4)["x"], batch["rows"]["x"])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_each_process_uploads_about_its_share_of_the_batch(processes):
  """Global batch 64 of 1,024 images (16 steps an epoch): K, the rows each process uploads per
  step, is the batch itself on one process and close to G/P on several: the most any process
  holds in any step of the epoch (never below G/P; the count in a shuffled batch spreads by about
  sqrt(G/P)), rounded up to the local devices (2). Measured: 40-42 for P = 2, 24-26 for P = 4."""
  n, global_batch, devices = 1024, 64, 2
  batch = global_batch // processes
  uploads = [feature_cache.cached_batches({"x": np.zeros((n // processes, 3), np.float32)}, num_images=n,
                                          batch_size=batch, seed=1, process_index=p, process_count=processes,
                                          multiple=devices)
             for p in range(processes)]
  for _ in range(3 * 16):  # three epochs
    shapes = {next(u)["rows"]["x"].shape for u in uploads}
    assert len(shapes) == 1
    (k, width), = shapes
    assert width == 3 and k % devices == 0
    assert batch <= k <= batch + 3 * np.sqrt(batch) + devices, (processes, k)
    if processes == 1:
      assert k == global_batch


def test_memory_cost_line():
  shapes = feature_cache.feature_shapes(MODEL, (IMAGE, IMAGE))
  assert shapes == {"bottleneck_input": (14, 32), "enc_groups": [(3, 3, 32)] * 2}
  line = feature_cache.describe(1234, shapes, feature_cache.cache_dtype("bfloat16"))
  # 1234 * (14*32 + 2*9*32) values * 2 bytes = 2,527,232 bytes = 0.00235 GiB.
  assert line.startswith("Caching encoder features: 1,234 images x (14x32 bottleneck input + "
                         "2 x 3x3x32 group targets) in bfloat16 = 0.00 GiB")
  # Two processes, batch 8 each: 78 global batches of 16, 624 rows per process.
  line = feature_cache.describe(1234, shapes, feature_cache.cache_dtype("float32"), batch_size=8,
                                process_count=2)
  assert line.endswith("per process (624 rows: this process's share of 2).")


def test_bad_cache_dtype_names_the_field():
  with pytest.raises(ValueError, match="data.cache_dtype='float16'"):
    feature_cache.cache_dtype("float16")
