"""Dinomaly2's switches against independent computations: recentering, the two-part
bottleneck, the two learning rates; and a Dinomaly2 train step that learns on demo data."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from dinomaly_jax import sharding
from dinomaly_jax.config import validation
from dinomaly_jax.data import synthetic
from dinomaly_jax.data import transforms
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.models import decoder as dec
from dinomaly_jax.models import dinomaly
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.models.vit import DinoV2Encoder
from dinomaly_jax.training import optim
from dinomaly_jax.training import train_step as ts


def _demo_config(arg="method=dinomaly2,crop=56"):
  return importlib.import_module("configs.demo").get_config(arg)


def test_method_sets_every_switch_and_dinomaly_stays_the_default():
  c = importlib.import_module("configs.mvtec").get_config("method=dinomaly2,vit=large")
  m, t = c.model, c.train
  assert (m.context_recentering, m.bottleneck_down_dim, m.bottleneck_dropout,
          m.linear_attention_eps) == (True, 256, 0.4, 1e-8)
  assert (t.lr, t.bottleneck_first_lr, t.b1, t.b2, t.weight_decay, t.eps, t.amsgrad) == (
      2e-3, 2e-4, 0.9, 0.999, 1e-4, 1e-10, False)
  assert (t.lr_schedule, t.warmup_steps, t.steps, t.batch_size) == ("warmup_constant", 100, 40_000, 16)
  assert (c.data.resize, c.data.crop) == (448, 392)
  assert m.target_layers == [4, 6, 8, 10, 12, 14, 16, 18]
  d = importlib.import_module("configs.mvtec").get_config("")
  assert (d.model.context_recentering, d.model.bottleneck_down_dim, d.model.bottleneck_dropout,
          d.model.linear_attention_eps, d.train.amsgrad, d.train.lr_schedule,
          d.train.bottleneck_first_lr, d.train.steps) == (False, 0, 0.2, 0.0, True, "warm_cosine",
                                                          0.0, 10_000)
  for name in ("visa", "realiad", "folder", "demo"):
    c = importlib.import_module(f"configs.{name}").get_config("method=dinomaly2")
    assert c.model.context_recentering and c.train.bottleneck_first_lr == 2e-4, name
  with pytest.raises(ValueError, match="method must be one of"):
    importlib.import_module("configs.visa").get_config("method=dinomaly3")


def test_recentering_needs_the_class_token():
  c = _demo_config()
  c.model.conv_decoder_kernel = 3
  with pytest.raises(ConfigError, match="config.model.context_recentering must be false with "
                     "model.conv_decoder_kernel"):
    validation.validate(c)


def _numpy_recentre(tokens, num_patches):
  centred = tokens[:, -num_patches:].astype(np.float64) - tokens[:, :1]
  mean = centred.mean(-1, keepdims=True)
  var = centred.var(-1, keepdims=True)
  return (centred - mean) / np.sqrt(var + 1e-8)


def test_recentering_formula():
  tokens = np.random.default_rng(0).standard_normal((2, 5 + 9, 16)).astype(np.float32) * 3 + 1
  ours = np.asarray(dinomaly.recentre(jnp.asarray(tokens), 9))
  np.testing.assert_allclose(ours, _numpy_recentre(tokens, 9), atol=2e-5, rtol=0)  # |y| <= 4


ENCODER = DinoV2Encoder(embed_dim=32, depth=4, num_heads=2, num_registers=4, pos_grid=4)


def test_recentred_groups_in_the_model():
  """encode(): each group's mean over layers, then patches minus the class token, layer-normed."""
  images = np.random.default_rng(1).standard_normal((2, 42, 42, 3)).astype(np.float32)
  params = ENCODER.init(jax.random.key(0), images, [0])["params"]
  layers, groups = (0, 1, 2, 3), ((0, 1), (2, 3))
  features = [np.asarray(f, np.float64) for f in ENCODER.apply({"params": params}, images, list(layers))]
  model = Dinomaly(encoder=ENCODER, target_layers=layers, fuse_groups=groups, decoder_depth=4,
                   context_recentering=True)
  _, enc_groups = model.apply({"params": {"encoder": params}}, images, method=Dinomaly.encode)
  for group, ours in zip(groups, enc_groups):
    expected = _numpy_recentre(np.mean([features[i] for i in group], axis=0), 9).reshape(2, 3, 3, 32)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)  # float32 encoder
  plain = Dinomaly(encoder=ENCODER, target_layers=layers, fuse_groups=groups, decoder_depth=4)
  _, plain_groups = plain.apply({"params": {"encoder": params}}, images, method=Dinomaly.encode)
  expected_plain = np.mean([features[i] for i in groups[0]], axis=0)[:, 5:].reshape(2, 3, 3, 32)
  np.testing.assert_allclose(np.asarray(plain_groups[0]), expected_plain, atol=1e-5, rtol=0)


def test_two_part_bottleneck_matches_numpy():
  dim, down = 24, 8
  x = np.random.default_rng(2).standard_normal((2, 7, dim)).astype(np.float32)
  module = dec.TwoPartBottleneck(down_dim=down, ratio=4, dropout=0.4)
  params = module.init(jax.random.key(0), x, train=False)["params"]
  params = jax.tree.map(lambda p: np.random.default_rng(p.size).standard_normal(p.shape)
                        .astype(np.float32) * 0.3, params)
  assert {k: v["kernel"].shape for k, v in params.items()} == {
      "down": (dim, down), "fc1": (down, 4 * dim), "fc2": (4 * dim, dim)}
  p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
  h = x @ p["down"]["kernel"] + p["down"]["bias"]  # no activation between the two parts
  h = h @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
  expected = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  ours = np.asarray(module.apply({"params": params}, x, train=False))
  np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)
  # Training: dropout 0.4 after each part; the output's zeros are its last dropout's (~40%).
  noisy = np.asarray(module.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)}))
  assert 0.3 < np.mean(noisy == 0) < 0.5
  assert not np.allclose(noisy, ours)


def _numpy_stable_adamw(params, grads, lrs, wd, eps, b1=0.9, b2=0.999):
  """StableAdamW (AMSGrad off) in float64; lrs[name][t] the learning rate of tensor `name` at step t."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t, g in enumerate(grads, start=1):
    for k in params:
      lr, gk = lrs[k][t - 1], g[k].astype(np.float64)
      params[k] = params[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      denom = np.sqrt(v[k]) / np.sqrt(1 - b2 ** t) + eps
      rms = np.sqrt(np.mean((gk / denom) ** 2))
      params[k] = params[k] - lr / (1 - b1 ** t) / max(1.0, rms) * m[k] / denom
  return params


SHAPES = {"bottleneck/down/kernel": (6, 3), "bottleneck/down/bias": (3,), "bottleneck/fc1/kernel": (3, 8),
          "bottleneck/fc2/kernel": (8, 6), "decoder/blocks_0/proj/kernel": (6, 6)}


def _nest(flat):
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


@pytest.mark.parametrize("down", [True, False])
def test_two_learning_rates_through_optimizer_steps(down):
  """Dinomaly2's optimizer (clip off) against numpy: 2e-4 for the bottleneck's first Linear
  ("down", or Dinomaly's "fc1"), 2e-3 for the rest, both warmed up over 3 steps then constant."""
  shapes = dict(SHAPES) if down else {k: s for k, s in SHAPES.items() if "/down/" not in k}
  first = "bottleneck/down/" if down else "bottleneck/fc1/"
  c = _demo_config().train
  c.clip_norm, c.warmup_steps, c.weight_decay = 1e9, 3, 0.05
  rng = np.random.default_rng(4)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
           for scale in (1.0, 30.0, 0.5, 2.0, 1.0, 0.1)]
  warm = [min(t / 3, 1.0) for t in range(len(grads))]  # Dinomaly2: lr * step / warmup, step 0 -> 0
  lrs = {k: [(2e-4 if k.startswith(first) else 2e-3) * w for w in warm] for k in shapes}
  expected = _numpy_stable_adamw(params, grads, lrs, wd=0.05, eps=1e-10)
  tx = optim.make_optimizer(c)
  ours = jax.tree.map(jnp.asarray, _nest(params))
  state = tx.init(ours)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, _nest(g)), state, ours)
    ours = optax.apply_updates(ours, updates)
  for k in shapes:
    leaf = ours
    for part in k.split("/"):
      leaf = leaf[part]
    moved = np.abs(expected[k] - params[k]).max()
    assert moved > (1e-5 if k.startswith(first) else 1e-4), k
    np.testing.assert_allclose(np.asarray(leaf), expected[k], atol=1e-6, rtol=0, err_msg=k)  # float32


def test_warmup_constant_schedule_values():
  schedule = optim.warmup_constant_schedule(2e-3, 100)
  for step, lr in ((0, 0.0), (1, 2e-5), (50, 1e-3), (99, 1.98e-3), (100, 2e-3), (39_999, 2e-3)):
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=0)


def test_dinomaly2_train_step_learns_on_demo_data(tmp_path):
  config = _demo_config()
  config.train.warmup_steps = 2
  root = synthetic.generate(str(tmp_path), seed=0, classes=("brick", "nut"), image_size=64,
                            n_train=4, n_test_good=1, n_test_bad=1)
  paths = sorted((tmp_path / "brick" / "train" / "good").glob("*.png"))
  paths += sorted((tmp_path / "nut" / "train" / "good").glob("*.png"))
  assert root and len(paths) == 8
  images = np.stack([transforms.preprocess_image(transforms.load_image(str(p)), config.data)
                     for p in paths])
  model = dinomaly.build_model(config.model)
  state = ts.create_train_state(model, config, jax.random.key(0), None, images.shape)
  assert set(state.params["bottleneck"]) == {"down", "fc1", "fc2"}
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_fn = ts.make_train_step(model, config, mesh)
  state = sharding.replicate(state, mesh)
  batch = sharding.global_batch({"image": images}, mesh, "train.batch_size")
  losses = []
  for _ in range(25):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses


def _dihedral(x):
  """The 8 rotations / flips of an (h, w, c) array."""
  for k in range(4):
    r = np.rot90(x, k)
    yield r
    yield r[:, ::-1]


def test_fewshot_augmentation_is_a_window_under_a_dihedral_transform():
  """Each output is, up to the ImageNet normalisation, a crop x crop window of the resized
  image turned by one of the 8 rotations/flips (found by brute force); over many draws every
  rotation and flip occurs and the window moves."""
  size, crop = 16, 12
  resized = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
  found = set()
  for seed in range(40):
    out = transforms.augment_crop(resized, crop, np.random.default_rng(seed))
    assert out.shape == (crop, crop, 3) and out.dtype == np.float32
    pixels = np.rint((out * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255)
    matches = [(t, top, left) for t, turned in enumerate(_dihedral(resized))
               for top in range(size - crop + 1) for left in range(size - crop + 1)
               if np.array_equal(turned[top:top + crop, left:left + crop], pixels)]
    if matches:  # ratio rounds to a crop x crop window: no resize, an exact window
      found.update(matches)
  transforms_seen = {t for t, _, _ in found}
  offsets_seen = {(top, left) for _, top, left in found}
  assert len(transforms_seen) == 8 and len(offsets_seen) > 5, (transforms_seen, offsets_seen)


def test_augmented_batches_repeat_and_resume(tmp_path):
  from dinomaly_jax.data import index as data_index
  from dinomaly_jax.data import pipeline
  config = _demo_config("method=dinomaly2,shots=4,crop=56")
  assert config.data.augment and config.data.shots == 4
  assert not _demo_config("method=dinomaly2,crop=56").data.augment
  assert not importlib.import_module("configs.mvtec").get_config("shots=4").data.augment
  synthetic.generate(str(tmp_path), seed=0, classes=("brick",), image_size=64, n_train=8,
                     n_test_good=1, n_test_bad=1)
  config.data.root, config.data.workers = str(tmp_path), 0
  records = data_index.build_records(config.data, "train")
  batches = lambda start, seed=0: pipeline.train_iterator(records, config.data, batch_size=4, seed=seed,
                                                         workers=0, start_step=start)
  first = [next(it)["image"] for it in [batches(0)] for _ in range(3)]
  again = batches(0)
  for expected in first:
    np.testing.assert_array_equal(next(again)["image"], expected)
  np.testing.assert_array_equal(next(batches(2))["image"], first[2])  # resume at step 2
  plain = dict(config.data)
  config.data.augment = False
  centre = next(pipeline.train_iterator(records, config.data, batch_size=4, seed=0, workers=0))["image"]
  config.data.augment = plain["augment"]
  assert not np.allclose(first[0], centre)  # the same images, augmented
