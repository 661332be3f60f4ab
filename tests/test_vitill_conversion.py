"""Trained reference ViTill state dict -> Dinomaly params, tensor by tensor."""
import functools
import math
import re

from dinov2.layers.block import Block as TorchDinoBlock
from dinov2.layers.mlp import Mlp as TorchMlp
from dinov2.models import vision_transformer as dinov2_vit
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.models import decoder as dec
from dinomaly_jax.models.dinomaly import Dinomaly
from dinomaly_jax.weights import convert as weights_convert
from dinomaly_jax.weights import dinov2_keys
from dinomaly_jax.weights.vitill_keys import convert_vitill

D, DEPTH = 64, 3


def _randomised(module):
  """The module's state dict (its own key names) with every tensor random, std 0.2."""
  return {k: 0.2 * torch.randn(v.shape) for k, v in module.state_dict().items()}


@functools.cache
def _vitill_state_dict():
  """A ViTill state dict as the reference saves it: encoder., bottleneck.0., decoder.{i}."""
  torch.manual_seed(0)
  encoder = dinov2_vit.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=D, depth=4,
                                             num_heads=1, init_values=1.0, block_chunks=0)
  bottleneck = torch.nn.ModuleList([TorchMlp(D, 4 * D, D)])  # bMlp: fc1, act, fc2
  decoder = torch.nn.ModuleList([
      TorchDinoBlock(D, 1, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-8))
      for _ in range(DEPTH)])
  state = {}
  for prefix, module in (("encoder", encoder), ("bottleneck", bottleneck), ("decoder", decoder)):
    state.update({f"{prefix}.{k}": v for k, v in _randomised(module).items()})
  state["encoder.register_tokens"] = torch.randn(1, 4, D)  # dinov2reg (PyPI dinov2 predates it)
  return state, decoder


def _leaf(tree, path):
  for part in path:
    tree = tree[part]
  return np.asarray(tree)


def _flax_path(key):
  """Reference key -> (flax path, layout) written out independently of the converter."""
  parts = key.split(".")
  if parts[0] == "bottleneck":
    parts = ["bottleneck"] + parts[2:]  # drop the ModuleList index 0
  else:
    parts = ["decoder", f"blocks_{parts[1]}"] + parts[2:]
  kind = parts[-2]
  if parts[-1] == "weight":
    parts[-1] = "scale" if kind.startswith("norm") else "kernel"
  return tuple(parts)


def test_reference_keys_are_as_expected():
  state, _ = _vitill_state_dict()
  trained = sorted(k for k in state if not k.startswith("encoder."))
  assert "bottleneck.0.fc1.weight" in trained and "decoder.0.attn.qkv.weight" in trained
  assert state["bottleneck.0.fc1.weight"].shape == (4 * D, D)
  assert state["decoder.2.attn.qkv.weight"].shape == (3 * D, D)
  assert len(trained) == 4 + DEPTH * 12


def test_every_tensor_lands_where_it_belongs():
  state, _ = _vitill_state_dict()
  params = convert_vitill(state)
  assert sorted(params) == ["bottleneck", "decoder", "encoder"]
  trained = [k for k in state if not k.startswith("encoder.")]
  for key in trained:
    value = state[key].numpy()
    expected = value.T if value.ndim == 2 else value
    np.testing.assert_array_equal(_leaf(params, _flax_path(key)), expected, err_msg=key)
  n_leaves = len(jax.tree.leaves({k: params[k] for k in ("bottleneck", "decoder")}))
  assert n_leaves == len(trained)  # nothing else in the tree
  encoder_params, _ = dinov2_keys.convert_dinov2_state_dict(state, prefix="encoder.")
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(encoder_params)):
    np.testing.assert_array_equal(a, b)


def test_converted_tree_is_the_model_tree_and_computes_like_torch():
  state, torch_decoder = _vitill_state_dict()
  params = convert_vitill(state)
  _, meta = dinov2_keys.convert_dinov2_state_dict(state, prefix="encoder.")
  model = Dinomaly(encoder=dinov2_keys.encoder_from_arch(meta), target_layers=(0, 1, 2, 3),
                   fuse_groups=((0, 1), (2,)), decoder_depth=DEPTH, decoder_attention="softmax")
  images = jnp.zeros((1, 28, 28, 3))
  init_shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, init_shapes)
  x = np.random.default_rng(0).standard_normal((2, 5 + 4, D)).astype(np.float32)
  torch_decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items()
                                 if k.startswith("decoder.")})
  expected = torch_decoder[1](torch.tensor(x)).detach().numpy()
  ours = dec.AttentionBlock(num_heads=1, kind="softmax").apply(
      {"params": params["decoder"]["blocks_1"]}, x)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)  # measured 1.4e-6 (|y| <= 4.6)


def test_conv_decoder_keys():
  state, _ = _vitill_state_dict()
  state = {k: v for k, v in state.items() if not re.match(r"decoder\.\d+\.attn\.", k)}
  kernel = 5
  for i in range(DEPTH):
    state[f"decoder.{i}.conv.pwconv1.weight"] = torch.randn(2 * D, D)
    state[f"decoder.{i}.conv.dwconv.weight"] = torch.randn(2 * D, 1, kernel, kernel)
    state[f"decoder.{i}.conv.pwconv2.weight"] = torch.randn(D, 2 * D)
  params = convert_vitill(state)
  conv = params["decoder"]["blocks_2"]["conv"]
  np.testing.assert_array_equal(conv["pwconv1"]["kernel"], state["decoder.2.conv.pwconv1.weight"].numpy().T)
  np.testing.assert_array_equal(conv["pwconv2"]["kernel"], state["decoder.2.conv.pwconv2.weight"].numpy().T)
  dw = state["decoder.2.conv.dwconv.weight"].numpy()
  assert conv["dwconv"]["kernel"].shape == (kernel, kernel, 1, 2 * D)
  for c in (0, 7, 2 * D - 1):
    np.testing.assert_array_equal(conv["dwconv"]["kernel"][:, :, 0, c], dw[c, 0])
  model = dec.Decoder(depth=DEPTH, conv_kernel=kernel)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4, D)), (2, 2)))
  assert jax.tree.map(np.shape, params["decoder"]) == jax.tree.map(lambda x: x.shape, shapes["params"])


def test_bad_keys_reported_together():
  state, _ = _vitill_state_dict()
  state = dict(state)
  del state["decoder.1.mlp.fc2.bias"]
  state["decoder.0.attn.qkv.weight"] = torch.zeros(3 * D, D + 1)
  state["decoder.0.attn.rel_pos"] = torch.zeros(3)
  with pytest.raises(CheckpointError) as error:
    convert_vitill(state)
  message = str(error.value)
  assert "3 problem(s)" in message
  assert "missing decoder.1.mlp.fc2.bias: expected shape (64,)" in message
  assert "shape mismatch decoder.0.attn.qkv.weight: expected (192, 64), found (192, 65)" in message
  assert "unexpected decoder.0.attn.rel_pos" in message


def test_not_a_vitill_state_dict():
  state, _ = _vitill_state_dict()
  encoder_only = {k: v for k, v in state.items() if k.startswith("encoder.")}
  with pytest.raises(CheckpointError, match="bottleneck.0.fc1.weight"):
    convert_vitill(dict(encoder_only, **{"decoder.0.norm1.weight": torch.zeros(D)}))


def test_convert_entry_point_uses_it():
  state, _ = _vitill_state_dict()
  tree, meta = weights_convert.convert_state_dict(state)
  assert meta["source_format"] == "dinomaly-vitill"
  np.testing.assert_array_equal(tree["bottleneck"]["fc2"]["bias"], state["bottleneck.0.fc2.bias"].numpy())


DOWN = 16


def _dinomaly2_state_dict():
  """A Dinomaly2 state dict: the ViTill one with its two-part bottleneck
  (bottleneck.0 = Sequential(Linear(D, 256), Dropout), bottleneck.1 = Sequential(Linear(256, 4D),
  GELU, Dropout, Linear(4D, D), Dropout)), here with a first width of 16."""
  state, _ = _vitill_state_dict()
  state = {k: v for k, v in state.items() if not k.startswith("bottleneck.")}
  bottleneck = torch.nn.ModuleList([
      torch.nn.Sequential(torch.nn.Linear(D, DOWN), torch.nn.Dropout(0.4)),
      torch.nn.Sequential(torch.nn.Linear(DOWN, 4 * D), torch.nn.GELU(), torch.nn.Dropout(0.4),
                          torch.nn.Linear(4 * D, D), torch.nn.Dropout(0.4))])
  state.update({f"bottleneck.{k}": v for k, v in _randomised(bottleneck).items()})
  return state


def test_dinomaly2_keys_land_and_compute_the_two_part_bottleneck():
  state = _dinomaly2_state_dict()
  assert sorted(k for k in state if k.startswith("bottleneck.")) == [
      "bottleneck.0.0.bias", "bottleneck.0.0.weight", "bottleneck.1.0.bias", "bottleneck.1.0.weight",
      "bottleneck.1.3.bias", "bottleneck.1.3.weight"]
  params = convert_vitill(state)
  for key, name in (("0.0", "down"), ("1.0", "fc1"), ("1.3", "fc2")):
    np.testing.assert_array_equal(params["bottleneck"][name]["kernel"],
                                  state[f"bottleneck.{key}.weight"].numpy().T)
    np.testing.assert_array_equal(params["bottleneck"][name]["bias"], state[f"bottleneck.{key}.bias"].numpy())
  np.testing.assert_array_equal(params["decoder"]["blocks_2"]["attn"]["qkv"]["kernel"],
                                state["decoder.2.attn.qkv.weight"].numpy().T)
  x = np.random.default_rng(0).standard_normal((2, 5, D))
  w = {k: state[f"bottleneck.{k}"].numpy().astype(np.float64) for k in
       ("0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias", "1.3.weight", "1.3.bias")}
  h = (x @ w["0.0.weight"].T + w["0.0.bias"]) @ w["1.0.weight"].T + w["1.0.bias"]  # torch Linear: x W^T + b
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  expected = h @ w["1.3.weight"].T + w["1.3.bias"]
  ours = dec.TwoPartBottleneck(down_dim=DOWN).apply({"params": params["bottleneck"]},
                                                    x.astype(np.float32), train=False)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=1e-5)
  tree, meta = weights_convert.convert_state_dict(state)
  assert (meta["source_format"], meta["bottleneck_down_dim"]) == ("dinomaly2", DOWN)
  del state["bottleneck.1.3.bias"]
  with pytest.raises(CheckpointError, match=r"(?s)Dinomaly2 state dict .*missing bottleneck.1.3.bias"):
    convert_vitill(state)
