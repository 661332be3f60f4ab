"""Parity of DinoV3Encoder with transformers' DINOv3ViTModel (an independent PyPI implementation).

Every tensor of the HF model is randomised (LayerScale in [0.1, 1], linear
weights at unit gain). Each model is saved in a real checkpoint layout and
converted through the CLI: the HF Hub safetensors layout (`save_pretrained`), or
the official DINOv3 `.pth` layout built by inverting transformers' own
official -> HF key map (`convert_dinov3_vit_to_hf.py`: qkv split into q/k/v with
the key bias dropped, `storage_tokens` -> `register_tokens`, `ls1.gamma` ->
`layer_scale1.lambda1`, SwiGLU w1/w2/w3 -> gate/up/down). The official file gets
a non-zero key bias that its `bias_mask` must cancel. Errors are max abs over
all hidden states (every block's output, prefix tokens included).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.initialization import no_init_weights

from benchmarks.torch_weights import randomize_
from dinomaly_jax.weights import dinov3_keys
from tests.test_vit_parity import convert_cli, hf_layers, max_error, random_images

FP32_TOL = 1e-4
SIZES = [224, 392, 448, 512]


def hf_model(seed, **config):
  """A randomised DINOv3ViTModel; 64-dim heads and 4 registers like every released size."""
  fields = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_register_tokens=4, patch_size=16, layer_norm_eps=1e-5)
  with no_init_weights():  # every parameter is then randomised (transformers' init is slow)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**fields, **config}))
  return randomize_(model, seed)


def official_state_dict(model) -> dict:
  """The official DINOv3 .pth layout of an HF model (see module doc)."""
  sd, config = model.state_dict(), model.config
  head_dim = config.hidden_size // config.num_attention_heads
  out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
         "mask_token": sd["embeddings.mask_token"][0],  # official shape (1, D)
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
         # The official buffer: base ** (2 * arange(d / 4) / (d / 2)), base 100.
         "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)),
         "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
  gen = torch.Generator().manual_seed(99)
  for i in range(config.num_hidden_layers):
    hf, pt = f"model.layer.{i}.", f"blocks.{i}."
    attn = lambda name: sd[f"{hf}attention.{name}"]
    out[pt + "attn.qkv.weight"] = torch.cat([attn("q_proj.weight"), attn("k_proj.weight"),
                                             attn("v_proj.weight")])
    key_bias = torch.randn(config.hidden_size, generator=gen)  # masked out by bias_mask
    out[pt + "attn.qkv.bias"] = torch.cat([attn("q_proj.bias"), key_bias, attn("v_proj.bias")])
    out[pt + "attn.qkv.bias_mask"] = torch.cat([torch.ones(config.hidden_size),
                                                torch.zeros(config.hidden_size),
                                                torch.ones(config.hidden_size)])
    out[pt + "attn.proj.weight"], out[pt + "attn.proj.bias"] = attn("o_proj.weight"), attn("o_proj.bias")
    for n in (1, 2):
      out[f"{pt}ls{n}.gamma"] = sd[f"{hf}layer_scale{n}.lambda1"]
      out[f"{pt}norm{n}.weight"], out[f"{pt}norm{n}.bias"] = sd[f"{hf}norm{n}.weight"], sd[f"{hf}norm{n}.bias"]
    mlp = (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3")) if config.use_gated_mlp else (
        ("up_proj", "fc1"), ("down_proj", "fc2"))
    for hf_name, name in mlp:
      for suffix in ("weight", "bias"):
        out[f"{pt}mlp.{name}.{suffix}"] = sd[f"{hf}mlp.{hf_name}.{suffix}"]
  return {k: v.clone().contiguous() for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, layers):
  return jax.jit(lambda params, images: model.apply({"params": params}, images, list(layers)))


def encoder_outputs(params, meta, images_nchw, layers, dtype=jnp.float32):
  model = dinov3_keys.encoder_from_arch(meta, dtype=dtype)
  outputs = _jitted_apply(model, tuple(layers))(params, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
  return [np.asarray(o) for o in outputs]


def all_layers_error(model, params, meta, size):
  """Max abs error over all blocks at size x size. At 392 (not a multiple of 16) HF's
  stride-16 patch conv ignores the last 8 rows and columns; our encoder refuses such
  sizes (and configs refuse such crops), so it gets the 384 x 384 part HF reads."""
  images = random_images(1, (size, size), seed=size)
  used = size // 16 * 16
  layers = list(range(model.config.num_hidden_layers))
  return max_error(hf_layers(model, images, layers),
                   encoder_outputs(params, meta, images[:, :, :used, :used], layers))


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
  """A 2-block GELU-MLP model saved as the Hub's model.safetensors and converted."""
  model = hf_model(seed=30)
  assert model.config.patch_size == 16
  directory = tmp_path_factory.mktemp("hf_tiny")
  model.save_pretrained(directory)
  params, meta = convert_cli(directory / "model.safetensors", directory / "converted")
  return model, params, meta


@pytest.mark.parametrize("size", SIZES)
def test_hf_safetensors_parity(hf_tiny, size):
  model, params, meta = hf_tiny
  assert (meta["family"], meta["source_format"], meta["registers"], meta["ffn"]) == (
      "dinov3", "hf", 4, "mlp")
  assert all_layers_error(model, params, meta, size) <= FP32_TOL  # measured 5.6e-6 .. 6.2e-6


def test_bfloat16_compute(hf_tiny):
  model, params, meta = hf_tiny
  images = random_images(1, (224, 224))
  reference = hf_layers(model, images, [0, 1])
  outputs = encoder_outputs(params, meta, images, [0, 1], dtype=jnp.bfloat16)
  scale = max(float(np.abs(r).max()) for r in reference)
  # bfloat16 keeps 8 mantissa bits (RoPE is applied in float32): measured 0.050 max abs
  # error at max |activation| 6.5, i.e. 0.8% of the largest activation; tolerance 3%.
  assert max_error(reference, outputs) <= 0.03 * scale


@pytest.fixture(scope="module")
def official_swiglu(tmp_path_factory):
  """A 2-block SwiGLU model (as ViT-S+/H+: silu gate) in the official .pth layout, converted."""
  model = hf_model(seed=31, use_gated_mlp=True, hidden_act="silu", intermediate_size=192)
  path = tmp_path_factory.mktemp("official_swiglu") / "dinov3_custom_pretrain.pth"
  torch.save(official_state_dict(model), path)
  params, meta = convert_cli(path, path.parent / "converted")
  return model, params, meta


@pytest.mark.parametrize("size", SIZES)
def test_official_swiglu_parity(official_swiglu, size):
  model, params, meta = official_swiglu
  assert (meta["source_format"], meta["ffn"], meta["ffn_hidden_dim"], meta["rope_base"]) == (
      "official", "swiglu", 192, 100.0)
  assert all_layers_error(model, params, meta, size) <= FP32_TOL  # measured 5.3e-6 .. 6.2e-6


def test_official_vits16_parity(tmp_path):
  """The released ViT-S/16 architecture, all 12 blocks, at 224."""
  model = hf_model(seed=32, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                   num_attention_heads=6)
  torch.save(official_state_dict(model), tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth")
  params, meta = convert_cli(tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth", tmp_path / "converted")
  assert (meta["family"], meta["vit"], meta["num_heads"]) == ("dinov3", "small", 6)
  assert all_layers_error(model, params, meta, 224) <= FP32_TOL  # measured 8.6e-6
