"""Decoder, attention variants, bottleneck, model wiring and its config checks."""
import functools

from dinov2.layers.block import Block as TorchDinoBlock
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.models import decoder as dec
from dinomaly_jax.models.dinomaly import build_model
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.models.vit import DinoV2Encoder

RNG = np.random.default_rng(0)


def _qkv(b=2, h=3, n=11, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, h, n, d)), jnp.float32) for _ in range(3)]


def test_linear_attention_equals_quadratic_form():
  q, k, v = _qkv()
  phi = lambda x: np.where(x > 0, x + 1, np.exp(x))  # elu + 1
  weights = np.einsum("bhnd,bhmd->bhnm", phi(np.asarray(q, np.float64)), phi(np.asarray(k, np.float64)))
  expected = np.einsum("bhnm,bhmd->bhnd", weights / weights.sum(-1, keepdims=True), np.asarray(v))
  # measured max abs diff 1.2e-7 (float32 vs float64)
  np.testing.assert_allclose(dec.linear_attention(q, k, v), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(dec.qk_v_linear_attention(q, k, v), expected, atol=1e-5, rtol=0)


def test_linear_attention_eps_switch():
  q, k, v = _qkv()
  phi = lambda x: jnp.where(x > 0, x + 1, jnp.exp(x))
  numerator = jnp.einsum("bhnd,bhmd,bhme->bhne", phi(q), phi(k), v)
  denominator = jnp.einsum("bhnd,bhmd->bhn", phi(q), phi(k))[..., None]
  np.testing.assert_allclose(dec.linear_attention(q, k, v, eps=1.0), numerator / (denominator + 1.0),
                             atol=1e-5, rtol=0)
  assert float(jnp.abs(dec.linear_attention(q, k, v) - numerator / denominator).max()) < 1e-5


def test_softmax_attention_matches_torch_sdpa():
  q, k, v = _qkv()
  expected = torch.nn.functional.scaled_dot_product_attention(
      *(torch.tensor(np.asarray(x)) for x in (q, k, v))).numpy()
  np.testing.assert_allclose(dec.softmax_attention(q, k, v), expected, atol=1e-6, rtol=0)


def test_neighbour_mask_matches_definition():
  h, w, size, prefix = 4, 5, 3, 2
  mask = dec.neighbour_mask((h, w), size, prefix)
  assert mask.shape == (prefix + h * w,) * 2
  assert mask[:prefix].all() and mask[:, :prefix].all()
  for i in range(h * w):
    for j in range(h * w):
      (r1, c1), (r2, c2) = divmod(i, w), divmod(j, w)
      inside = r1 - 1 <= r2 <= r1 + 1 and c1 - 1 <= c2 <= c1 + 1
      assert mask[prefix + i, prefix + j] == (not inside)


def test_masked_variants_zero_the_neighbourhood():
  q, k, v = _qkv(n=2 + 9)
  mask = jnp.asarray(dec.neighbour_mask((3, 3), 3, 2))
  logits = np.einsum("bhnd,bhmd->bhnm", np.asarray(q), np.asarray(k)) / np.sqrt(8)
  soft = np.exp(logits - logits.max(-1, keepdims=True))
  soft = soft / soft.sum(-1, keepdims=True) * np.asarray(mask)  # zeroed after softmax, no renorm
  np.testing.assert_allclose(dec.softmax_attention(q, k, v, mask),
                             np.einsum("bhnm,bhmd->bhnd", soft, np.asarray(v)), atol=1e-5, rtol=0)
  phi = lambda x: np.where(x > 0, x + 1, np.exp(x))
  lin = np.einsum("bhnd,bhmd->bhnm", phi(np.asarray(q)), phi(np.asarray(k))) * np.asarray(mask)
  lin = lin / lin.sum(-1, keepdims=True)
  np.testing.assert_allclose(dec.qk_v_linear_attention(q, k, v, mask),
                             np.einsum("bhnm,bhmd->bhnd", lin, np.asarray(v)), atol=1e-5, rtol=0)


def _randomise(params, seed=1):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(x.shape) * 0.2, jnp.float32)
                                   for x in leaves])


def _block_params_to_torch(p, block):
  """Our block's params into a torch block with the same (reference) names."""
  t = lambda x: torch.tensor(np.asarray(x))
  with torch.no_grad():
    for norm in ("norm1", "norm2"):
      getattr(block, norm).weight.copy_(t(p[norm]["scale"]))
      getattr(block, norm).bias.copy_(t(p[norm]["bias"]))
    for module, path in ((block.attn.qkv, ("attn", "qkv")), (block.attn.proj, ("attn", "proj")),
                         (block.mlp.fc1, ("mlp", "fc1")), (block.mlp.fc2, ("mlp", "fc2"))):
      module.weight.copy_(t(p[path[0]][path[1]]["kernel"]).T)
      module.bias.copy_(t(p[path[0]][path[1]]["bias"]))


def test_softmax_block_matches_dinov2_block_and_linear_kinds_agree():
  x = jnp.asarray(RNG.standard_normal((2, 13, 32)), jnp.float32)
  block = dec.AttentionBlock(num_heads=4, kind="softmax")
  params = _randomise(block.init(jax.random.key(0), x)["params"])
  torch_block = TorchDinoBlock(32, 4, qkv_bias=True,
                               norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-8))
  _block_params_to_torch(params, torch_block)
  expected = torch_block(torch.tensor(np.asarray(x))).detach().numpy()
  ours = block.apply({"params": params}, x)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)  # measured 4.8e-7
  linear = dec.AttentionBlock(num_heads=4, kind="linear").apply({"params": params}, x)
  quadratic = dec.AttentionBlock(num_heads=4, kind="qk_v_linear").apply({"params": params}, x)
  np.testing.assert_allclose(linear, quadratic, atol=1e-5, rtol=0)


def test_initialisation_as_reference():
  x = jnp.zeros((1, 5 + 9, 64))
  model = dec.Decoder(depth=2, num_heads=2)
  params = jax.jit(lambda r: model.init(r, x, (3, 3)))(jax.random.key(0))["params"]
  params["bottleneck"] = jax.jit(lambda r: dec.NoisyBottleneck().init(r, x, train=False))(
      jax.random.key(1))["params"]
  kernels = [v for path, v in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel"]
  biases = [v for path, v in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "bias"]
  scales = [v for path, v in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "scale"]
  allk = np.concatenate([np.ravel(k) for k in kernels])
  assert np.abs(allk).max() <= 0.03
  # truncated N(0, 0.01) at 3 sigma has std 0.00986
  np.testing.assert_allclose(allk.std(), 0.00986, rtol=0.02)
  assert all(np.all(np.asarray(b) == 0) for b in biases)
  assert all(np.all(np.asarray(s) == 1) for s in scales)
  conv = jax.jit(lambda r: dec.Decoder(depth=1, conv_kernel=5).init(r, x[:, 5:], (3, 3)))(
      jax.random.key(2))["params"]
  dw = np.asarray(conv["blocks_0"]["conv"]["dwconv"]["kernel"])
  assert dw.shape == (5, 5, 1, 128) and np.abs(dw).max() <= 1 / 5 and dw.std() > 0.1


def test_sepconv_matches_torch_depthwise_conv():
  b, (h, w), d, k = 2, (3, 4), 8, 3
  x = jnp.asarray(RNG.standard_normal((b, h * w, d)), jnp.float32)
  conv = dec.SepConv(kernel=k)
  params = _randomise(conv.init(jax.random.key(0), x, (h, w))["params"])
  t = lambda a: torch.tensor(np.asarray(a))
  y = torch.nn.functional.gelu(t(x) @ t(params["pwconv1"]["kernel"]))  # (B, hw, 2D)
  y = y.permute(0, 2, 1).reshape(b, 2 * d, h, w)
  weight = t(params["dwconv"]["kernel"]).permute(3, 2, 0, 1)  # (2D, 1, k, k)
  y = torch.nn.functional.conv2d(y, weight, padding=k // 2, groups=2 * d)
  y = y.reshape(b, 2 * d, h * w).permute(0, 2, 1) @ t(params["pwconv2"]["kernel"])
  ours = conv.apply({"params": params}, x, (h, w))
  np.testing.assert_allclose(ours, y.numpy(), atol=1e-5, rtol=0)


def test_bottleneck_dropout():
  x = jnp.asarray(RNG.standard_normal((2, 7, 16)), jnp.float32)
  module = dec.NoisyBottleneck(ratio=4, dropout=0.2)
  params = _randomise(module.init(jax.random.key(0), x, train=False)["params"])
  gelu = lambda a: nn.gelu(a, approximate=False)
  expected = gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"]) @ params["fc2"]["kernel"]
  expected = expected + params["fc2"]["bias"]
  np.testing.assert_allclose(module.apply({"params": params}, x, train=False), expected, atol=1e-5)
  noisy = module.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
  zeros = float(jnp.mean(noisy == 0))  # the last dropout zeroes ~20% of the outputs
  assert 0.1 < zeros < 0.3
  quiet = dec.NoisyBottleneck(dropout=0.0).apply({"params": params}, x, train=True,
                                                  rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(quiet, expected, atol=1e-5)


ENCODER = DinoV2Encoder(embed_dim=32, depth=5, num_heads=2, num_registers=4, pos_grid=4)


@functools.cache
def _model_and_params():
  model = Dinomaly(encoder=ENCODER, target_layers=(1, 2, 3, 4), fuse_groups=((0, 1), (2, 3)),
                   decoder_depth=4)
  images = jnp.asarray(RNG.standard_normal((2, 42, 28, 3)), jnp.float32)
  init = jax.jit(lambda r: model.init(r, images, train=False))
  params = _randomise(init(jax.random.key(0))["params"], seed=4)
  return model, params, images


def test_model_groups_layers_and_reversed_blocks():
  model, params, images = _model_and_params()
  enc_groups, dec_groups = jax.jit(lambda p: model.apply({"params": p}, images, train=False))(params)
  assert [g.shape for g in enc_groups + dec_groups] == [(2, 3, 2, 32)] * 4
  feats = ENCODER.apply({"params": params["encoder"]}, images, [1, 2, 3, 4])  # (B, 5 + 6, D)
  np.testing.assert_allclose(enc_groups[1], ((feats[2] + feats[3]) / 2)[:, 5:].reshape(2, 3, 2, 32),
                             atol=1e-5)
  bottleneck_input, _ = model.apply({"params": params}, images, method=Dinomaly.encode)
  np.testing.assert_allclose(bottleneck_input, sum(feats) / 4, atol=1e-5)  # prefix tokens kept
  x = dec.NoisyBottleneck().apply({"params": params["bottleneck"]}, bottleneck_input, train=False)
  blocks = dec.Decoder(depth=4, num_heads=2).apply({"params": params["decoder"]}, x, (3, 2))
  # group 0 of the reversed list = blocks 3 and 2; group 1 = blocks 1 and 0
  np.testing.assert_allclose(dec_groups[0], ((blocks[3] + blocks[2]) / 2)[:, 5:].reshape(2, 3, 2, 32),
                             atol=1e-5)
  np.testing.assert_allclose(dec_groups[1], ((blocks[1] + blocks[0]) / 2)[:, 5:].reshape(2, 3, 2, 32),
                             atol=1e-5)


def test_encoder_gets_no_gradient_through_model():
  model, params, images = _model_and_params()
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(e) + jnp.sum(d) for e, d in zip(
      *model.apply({"params": p}, images, train=False)))))(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["encoder"]))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["decoder"]))


@pytest.mark.parametrize("variant", [
    dict(decoder_attention="softmax", mask_neighbor_size=2),
    dict(decoder_attention="qk_v_linear", mask_neighbor_size=3),
    dict(conv_decoder_kernel=3),
    dict(target_layers=(1, 2, 3, 4), fuse_groups=((0,), (1,), (2,), (3,))),  # tight matching
])
def test_variants_run(variant):
  kwargs = dict(encoder=ENCODER, target_layers=(1, 2, 3, 4), fuse_groups=((0, 1), (2, 3)),
                decoder_depth=4)
  kwargs.update(variant)
  model = Dinomaly(**kwargs)
  images = jnp.zeros((1, 28, 28, 3))
  enc_groups, dec_groups = jax.eval_shape(
      lambda: model.apply(model.init(jax.random.key(0), images, train=False), images, train=False))
  assert len(enc_groups) == len(dec_groups) == len(kwargs["fuse_groups"])
  assert all(g.shape == (1, 2, 2, 32) for g in enc_groups + dec_groups)


@pytest.mark.parametrize("field,value,message", [
    ("fuse_groups", [[0, 1], [8]], "model.fuse_groups"),
    ("mask_neighbor_size", 3, "model.mask_neighbor_size"),
    ("conv_decoder_kernel", 4, "model.conv_decoder_kernel"),
    ("decoder_attention", "performer", "model.decoder_attention"),
    ("target_layers", [2, 3, 4, 12], "model.target_layers"),
])
def test_bad_config_names_the_field(field, value, message):
  config = base_config().model
  config.vit = "small"
  setattr(config, field, value)
  with pytest.raises(ValueError, match=message):
    build_model(config)


def test_build_model_reference_tree():
  config = base_config().model
  config.vit, config.registers = "small", 4
  model = build_model(config)
  images = jnp.zeros((1, 56, 56, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
  assert set(shapes) == {"encoder", "bottleneck", "decoder"}
  assert shapes["bottleneck"]["fc1"]["kernel"].shape == (384, 1536)
  assert sorted(shapes["decoder"]) == [f"blocks_{i}" for i in range(8)]
  assert shapes["decoder"]["blocks_0"]["attn"]["qkv"]["kernel"].shape == (384, 1152)
