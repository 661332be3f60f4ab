"""Parity of DinoV2Encoder with PyPI PyTorch DINOv2 implementations.

References (all independent of this project): the official `dinov2` package
(no registers; plain and chunked blocks), transformers' Dinov2Model and
Dinov2WithRegistersModel, and timm's `vit_*_patch14[_reg4]_dinov2`. Every
tensor is randomised (LayerScale gammas in [0.1, 1], linear weights at unit
gain so attention is peaked), saved in the real checkpoint format and converted
through the CLI. Errors are max abs over every requested layer output.

Position embeddings: transformers resizes with `size=` (Dinov2WithRegisters
also with antialias=True), which is not the official DINOv2 resize with the 0.1
offset that Dinomaly uses. The HF models are therefore run with their
`interpolate_pos_encoding` replaced by the official dinov2 package's method, so
both sides define the same computation; the resize itself is compared with the
official method and with torch.nn.functional.interpolate below.
"""
import functools
import importlib.abc
import importlib.machinery
import sys
import types

from dinov2.models import vision_transformer as dinov2_vit
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from benchmarks.torch_weights import official_layers
from benchmarks.torch_weights import randomize_
from dinomaly_jax.models import pos_embed
from dinomaly_jax.models import vit
from dinomaly_jax.weights import converted
from dinomaly_jax.weights import dinov2_keys
from weight_conversion import convert

PROTOCOL_LAYERS = [2, 3, 4, 5, 6, 7, 8, 9]
FP32_TOL = 1e-4
SIZES = [(224, 224), (392, 392), (224, 308)]


def random_images(batch, hw, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, *hw)).astype(np.float32)


def convert_cli(checkpoint, out_dir):
  assert convert.main(["--checkpoint", str(checkpoint), "--out", str(out_dir)]) == 0
  return converted.load_encoder(out_dir)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, layers):
  return jax.jit(lambda params, images: model.apply({"params": params}, images, list(layers)))


def encoder_outputs(params, meta, images_nchw, layers, dtype=jnp.float32):
  if meta["vit"] == "custom":
    model = dinov2_keys.encoder_from_arch(meta, dtype=dtype)
  else:
    model = vit.build_encoder(meta["vit"], meta["registers"], dtype=dtype, pos_grid=meta["pos_grid"])
  outputs = _jitted_apply(model, tuple(layers))(params, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
  return [np.asarray(o) for o in outputs]


def max_error(reference, outputs):
  assert [r.shape for r in reference] == [o.shape for o in outputs]
  return max(float(np.abs(r - o).max()) for r, o in zip(reference, outputs))


def use_official_interpolation(hf_model):
  """Makes an HF DINOv2 embed positions with the official dinov2 method (see module doc)."""
  embeddings = hf_model.embeddings
  owner = types.SimpleNamespace(patch_size=14)

  def interpolate(tokens, height, width):  # HF passes (tokens, H, W); official takes (x, w=H, h=W)
    owner.pos_embed = embeddings.position_embeddings
    return dinov2_vit.DinoVisionTransformer.interpolate_pos_encoding(owner, tokens, height, width)

  embeddings.interpolate_pos_encoding = interpolate
  return hf_model


def hf_layers(hf_model, images, layers):
  with torch.no_grad():
    hidden = hf_model(pixel_values=torch.from_numpy(images), output_hidden_states=True).hidden_states
  return [hidden[i + 1].numpy() for i in layers]  # hidden[0] is the embedding output


def timm_layers(model, images, layers):
  """Raw block outputs of a timm VisionTransformer, prefix tokens included."""
  with torch.no_grad():
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(torch.from_numpy(images))))
    outputs = []
    for block in model.blocks[:max(layers) + 1]:
      tokens = block(tokens)
      outputs.append(tokens.numpy())
  return [outputs[i] for i in layers]


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Test-only stand-in for torchvision (not installable beside CPU torch here).

  timm imports torchvision only in data / norm-layer modules that the ViT does
  not use; every `torchvision.*` name resolves to an empty placeholder class,
  so any real use would fail loudly instead of computing something.
  """

  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []
    module.__getattr__ = self._placeholder
    return module

  def exec_module(self, module):
    pass

  @staticmethod
  def _placeholder(name):
    if name.startswith("__"):
      raise AttributeError(name)
    meta = type("Placeholder", (type,), {"__getattr__": lambda cls, attr: _TorchvisionStub._placeholder(attr)})
    return meta(name, (), {})


@pytest.fixture(scope="module")
def timm_module():
  try:
    import torchvision  # noqa: F401  (a real one, where installed and loadable)
    stub = None
  except (ImportError, RuntimeError):  # absent, or PyPI's build that fails beside CPU torch
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    stub = _TorchvisionStub()
    sys.meta_path.insert(0, stub)
  import timm  # Imported after the stub is in place.
  yield timm
  if stub is not None:
    sys.meta_path.remove(stub)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]


# --- Position embeddings -------------------------------------------------------


@pytest.mark.parametrize("scale", [(16.1 / 37, 16.1 / 37), (28.1 / 37, 22.1 / 37), (2.0, 1.5), (0.33, 0.77)])
def test_bicubic_resize_matches_torch(scale):
  grid = np.random.default_rng(1).standard_normal((37, 37, 8)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], scale_factor=scale,
                                        mode="bicubic", align_corners=False, antialias=False)
  out = pos_embed.bicubic_resize(jnp.asarray(grid), scale)
  # Measured 2.6e-6 .. 7.9e-6 for N(0, 1) inputs: torch's own float32 vs float64 differ by 4e-6.
  np.testing.assert_allclose(np.asarray(out), ref[0].permute(1, 2, 0).numpy(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("grid_hw", [(16, 16), (28, 28), (16, 22), (37, 37), (40, 12)])
def test_interpolate_pos_embed_matches_official(grid_hw):
  table = torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(2))
  owner = types.SimpleNamespace(pos_embed=table, patch_size=14)
  tokens = torch.zeros(1, 1 + grid_hw[0] * grid_hw[1], 16)
  h, w = (14 * g for g in grid_hw)
  ref = dinov2_vit.DinoVisionTransformer.interpolate_pos_encoding(owner, tokens, h, w)
  out = pos_embed.interpolate_pos_embed(jnp.asarray(table.numpy()), grid_hw)
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=2e-5, rtol=0)


# --- Official dinov2 package (no registers) ------------------------------------


@pytest.fixture(scope="module")
def official_small(tmp_path_factory):
  model = randomize_(dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), 10)
  path = tmp_path_factory.mktemp("official_small") / "dinov2_vits14_pretrain.pth"
  torch.save(model.state_dict(), path)
  params, meta = convert_cli(path, path.parent / "converted")
  return model, params, meta


@pytest.mark.parametrize("hw", SIZES)
def test_official_small_parity(official_small, hw):
  model, params, meta = official_small
  assert (meta["vit"], meta["registers"], meta["source_format"]) == ("small", 0, "official")
  images = random_images(2 if hw == (224, 224) else 1, hw)
  err = max_error(official_layers(model, images, PROTOCOL_LAYERS),
                  encoder_outputs(params, meta, images, PROTOCOL_LAYERS))
  assert err <= FP32_TOL  # measured 8.1e-6 .. 1.1e-5 (outputs up to ~14 in magnitude)


def test_official_chunked_small_parity(tmp_path):
  model = randomize_(dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=4), 11)
  assert any(k.startswith("blocks.3.9.") for k in model.state_dict())  # chunked keys
  torch.save(model.state_dict(), tmp_path / "chunked.pth")
  params, meta = convert_cli(tmp_path / "chunked.pth", tmp_path / "converted")
  images = random_images(1, (224, 308))
  layers = [0, 4, 11]
  err = max_error(official_layers(model, images, layers), encoder_outputs(params, meta, images, layers))
  assert err <= FP32_TOL  # measured 1.0e-5


def test_official_base_parity(tmp_path):
  model = randomize_(dinov2_vit.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), 12)
  torch.save(model.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
  params, meta = convert_cli(tmp_path / "dinov2_vitb14_pretrain.pth", tmp_path / "converted")
  assert meta["vit"] == "base"
  images = random_images(1, (224, 224))
  err = max_error(official_layers(model, images, PROTOCOL_LAYERS),
                  encoder_outputs(params, meta, images, PROTOCOL_LAYERS))
  assert err <= FP32_TOL  # measured 9.5e-6


def test_bfloat16_compute(official_small):
  model, params, meta = official_small
  images = random_images(1, (224, 224))
  reference = official_layers(model, images, PROTOCOL_LAYERS)
  outputs = encoder_outputs(params, meta, images, PROTOCOL_LAYERS, dtype=jnp.bfloat16)
  scale = max(float(np.abs(r).max()) for r in reference)
  # bfloat16 keeps 8 mantissa bits: measured 0.18 max abs error at max |activation| 14,
  # i.e. 1.3% of the largest activation; tolerance 3%.
  assert max_error(reference, outputs) <= 0.03 * scale


def test_official_swiglu_parity(tmp_path):
  model = randomize_(dinov2_vit.DinoVisionTransformer(
      patch_size=14, img_size=518, embed_dim=128, depth=2, num_heads=2, ffn_layer="swiglufused",
      init_values=1.0, block_chunks=0), 13)
  torch.save(model.state_dict(), tmp_path / "swiglu.pth")
  params, meta = convert_cli(tmp_path / "swiglu.pth", tmp_path / "converted")
  assert (meta["ffn"], meta["vit"]) == ("swiglu", "custom")
  images = random_images(1, (56, 70))
  err = max_error(official_layers(model, images, [0, 1]), encoder_outputs(params, meta, images, [0, 1]))
  assert err <= FP32_TOL  # measured 3.9e-6


# --- Hugging Face transformers (registers) ---------------------------------------


@pytest.fixture(scope="module")
def hf_small_reg4(tmp_path_factory):
  config = transformers.Dinov2WithRegistersConfig(
      hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
      num_register_tokens=4, layer_norm_eps=1e-6)
  model = use_official_interpolation(randomize_(transformers.Dinov2WithRegistersModel(config), 20))
  directory = tmp_path_factory.mktemp("hf_small_reg4")
  model.save_pretrained(directory / "hf")  # model.safetensors
  params, meta = convert_cli(directory / "hf" / "model.safetensors", directory / "converted")
  return model, params, meta


@pytest.mark.parametrize("hw", SIZES)
def test_hf_registers_small_parity(hf_small_reg4, hw):
  model, params, meta = hf_small_reg4
  assert (meta["vit"], meta["registers"], meta["source_format"]) == ("small", 4, "hf")
  images = random_images(1, hw)
  err = max_error(hf_layers(model, images, PROTOCOL_LAYERS),
                  encoder_outputs(params, meta, images, PROTOCOL_LAYERS))
  assert err <= FP32_TOL  # measured 8.6e-6 .. 1.05e-5


def test_hf_swiglu_parity(tmp_path):
  config = transformers.Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=518, patch_size=14, use_swiglu_ffn=True)
  model = use_official_interpolation(randomize_(transformers.Dinov2Model(config), 21))
  model.save_pretrained(tmp_path / "hf")
  params, meta = convert_cli(tmp_path / "hf" / "model.safetensors", tmp_path / "converted")
  assert (meta["ffn"], meta["registers"]) == ("swiglu", 0)
  images = random_images(2, (42, 56))
  err = max_error(hf_layers(model, images, [0, 1]), encoder_outputs(params, meta, images, [0, 1]))
  assert err <= FP32_TOL  # measured 3.9e-6


# --- timm -------------------------------------------------------------------------


def test_timm_registers_small_parity(timm_module, tmp_path):
  # Built at 224 (its own 16x16 grid), so timm's resize is not involved.
  model = randomize_(timm_module.create_model("vit_small_patch14_reg4_dinov2", img_size=224), 30)
  torch.save(model.state_dict(), tmp_path / "timm.pth")
  params, meta = convert_cli(tmp_path / "timm.pth", tmp_path / "converted")
  assert (meta["vit"], meta["registers"], meta["pos_grid"], meta["source_format"]) == ("small", 4, 16, "timm")
  images = random_images(1, (224, 224))
  err = max_error(timm_layers(model, images, PROTOCOL_LAYERS),
                  encoder_outputs(params, meta, images, PROTOCOL_LAYERS))
  assert err <= FP32_TOL  # measured 8.6e-6


def test_timm_packed_swiglu_parity(timm_module, tmp_path):
  # mlp_ratio chosen so timm's packed hidden size equals DINOv2's rounding (688 = 2 * 344).
  model = randomize_(timm_module.create_model(
      "vit_giant_patch14_dinov2", img_size=56, embed_dim=128, depth=2, num_heads=2, mlp_ratio=5.375), 31)
  torch.save(model.state_dict(), tmp_path / "timm_g.pth")
  params, meta = convert_cli(tmp_path / "timm_g.pth", tmp_path / "converted")
  assert meta["ffn"] == "swiglu"
  images = random_images(1, (56, 56))
  err = max_error(timm_layers(model, images, [0, 1]), encoder_outputs(params, meta, images, [0, 1]))
  assert err <= FP32_TOL  # measured 3.9e-6
