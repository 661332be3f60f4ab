"""DINOv3 conversion: layouts agree, bad keys are all listed, the family reaches the config
and work-directory checks."""
import importlib
import json
import re

import jax
import numpy as np
import pytest
import torch

from dinomaly_jax.config import saved as saved_config
from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.errors import EncoderWeightsError
from dinomaly_jax.errors import IncompatibleWorkdirError
from dinomaly_jax.models import dinov3
from dinomaly_jax.weights import convert as weights_convert
from dinomaly_jax.weights import converted
from dinomaly_jax.weights import encoder_weights
from tests.test_conversion import assert_cli_lists_problems
from tests.test_conversion import assert_same_params
from tests.test_conversion import tiny_official_state_dict
from tests.test_dinov3_parity import hf_model
from tests.test_dinov3_parity import official_state_dict


@pytest.fixture(scope="module")
def tiny():
  """A 2-block, 128-wide HF DINOv3ViTModel (randomised)."""
  return hf_model(seed=40)


def test_every_layout_gives_the_same_tree(tiny, tmp_path):
  """Hub file (`layer.N.`), transformers-5 state dict (`model.layer.N.`) and the official
  layout (with a non-zero key bias that bias_mask cancels) convert to one tree."""
  tiny.save_pretrained(tmp_path)
  hub, meta = weights_convert.convert_file(tmp_path / "model.safetensors")
  assert (meta["family"], meta["source_format"], meta["vit"]) == ("dinov3", "hf", "custom")
  in_memory, _ = weights_convert.convert_state_dict(tiny.state_dict())
  official, official_meta = weights_convert.convert_state_dict(official_state_dict(tiny))
  assert official_meta["source_format"] == "official"
  assert_same_params(hub, in_memory)
  assert_same_params(hub, official)
  qkv_bias = np.asarray(hub["encoder"]["blocks_0"]["attn"]["qkv"]["bias"])
  assert not qkv_bias[128:256].any() and qkv_bias[:128].any()  # no key bias, a query bias


def test_dinov2_meta_names_its_family():
  _, meta = weights_convert.convert_state_dict(tiny_official_state_dict())
  assert meta["family"] == "dinov2"


def test_official_bad_keys_are_all_listed(tmp_path, capsys):
  state = official_state_dict(hf_model(seed=41, num_hidden_layers=3))  # MLP width: 2 blocks of 3
  del state["blocks.1.ls2.gamma"]
  state["blocks.0.mlp.fc1.weight"] = torch.zeros(200, 128)
  state["blocks.0.attn.extra.weight"] = torch.zeros(3, 3)
  state["blocks.1.attn.qkv.bias_mask"] = torch.ones(5)
  assert_cli_lists_problems(state, tmp_path, capsys, (
      "missing blocks.1.ls2.gamma: expected shape (128,)",
      "shape mismatch blocks.0.mlp.fc1.weight: expected (256, 128), found (200, 128)",
      "unexpected blocks.0.attn.extra.weight: shape (3, 3)",
      "unexpected blocks.1.attn.qkv.bias_mask: shape (5,), without a blocks.1.attn.qkv.bias of "
      "that shape to mask"))


def test_hf_bad_keys_use_file_names(tiny):
  state = dict(tiny.state_dict())
  del state["model.layer.1.attention.k_proj.weight"]
  del state["model.layer.0.mlp.down_proj.bias"]
  with pytest.raises(CheckpointError) as error:
    weights_convert.convert_state_dict(state)
  message = str(error.value)
  assert ("incomplete blocks.1.attn.qkv.weight: it fuses 3 tensors, found only "
          "['model.layer.1.attention.q_proj.weight', 'model.layer.1.attention.v_proj.weight']") in message
  assert "missing blocks.1.attn.qkv.weight: expected shape (384, 128)" in message
  assert "missing blocks.0.mlp.fc2.bias: expected shape (128,)" in message


def test_rope_periods_are_checked(tiny):
  state = official_state_dict(tiny)
  state["rope_embed.periods"][3] *= 1.5
  with pytest.raises(CheckpointError, match=re.escape("rope_embed.periods: not of the form base ** (4k / 64)")):
    weights_convert.convert_state_dict(state)


def test_family_mismatch_is_refused(tmp_path):
  """Converted weights say their family; a config of the other family is refused."""
  converted.save_params(tmp_path / "w", {"encoder": {"cls_token": np.zeros((1, 1, 384), np.float32)}},
                        dict(family="dinov3", vit="small", registers=4))
  config = importlib.import_module("configs.mvtec").get_config("vit=small")
  config.model.registers = 4  # explicit (the configs' -1 is read from the weights by run.run)
  config.encoder_weights = str(tmp_path / "w")
  with pytest.raises(EncoderWeightsError, match=re.escape(
      "holds dinov3 ViT-small with 4 registers, but the config asks for dinov2 ViT-small with 4 "
      "registers")):
    encoder_weights.load_pretrained(config)
  config = importlib.import_module("configs.mvtec").get_config("encoder=dinov3_vits16")
  config.encoder_weights = str(tmp_path / "w")
  assert encoder_weights.load_pretrained(config)["encoder"]["cls_token"].shape == (1, 1, 384)


def test_workdirs_saved_before_the_family_field_are_dinov2(tmp_path):
  config = importlib.import_module("configs.mvtec").get_config()
  saved = json.loads(config.to_json())
  del saved["model"]["family"]  # as written before DINOv3 support
  (tmp_path / saved_config.CONFIG_FILE).write_text(json.dumps(saved))
  saved_config.check_compatible(str(tmp_path), config)  # resumes
  with pytest.raises(IncompatibleWorkdirError, match="config.model.family: saved 'dinov2', now 'dinov3'"):
    saved_config.check_compatible(str(tmp_path), importlib.import_module("configs.mvtec").get_config(
        "encoder=dinov3_vitb16"))


def test_encoder_input_errors():
  with pytest.raises(ValueError, match="DINOv3 vit must be one of"):
    dinov3.build_encoder("giant")
  with pytest.raises(ValueError, match="registers must be 4 for DINOv3"):
    dinov3.build_encoder("small", registers=0)
  model = dinov3.DinoV3Encoder(embed_dim=128, depth=2, num_heads=2, ffn_hidden_dim=256)
  with pytest.raises(ValueError, match="multiples of 16.*40x32"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 40, 32, 3), np.float32), [0])
