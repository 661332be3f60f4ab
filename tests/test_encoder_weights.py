"""The main job's encoder weights: missing, mismatched, or an official .pth converted once."""
import importlib
import os

from dinov2.models import vision_transformer as dinov2_vit
import jax
import numpy as np
import pytest
import torch

from dinomaly_jax.errors import EncoderWeightsError
from dinomaly_jax.training import model_state
from dinomaly_jax.weights import converted


def _config(**model):
  c = importlib.import_module("configs.mvtec").get_config("vit=small")
  c.data.root = "/unused"
  c.data.crop = 28
  for k, v in model.items():
    c.model[k] = v
  return c


def test_real_configs_without_weights_explain_how_to_get_them():
  with pytest.raises(EncoderWeightsError) as e:
    model_state.build(_config())
  assert "python -m weight_conversion.convert --download vitb14_reg4" in str(e.value)


def test_missing_weights_path_is_named(tmp_path):
  c = _config()
  c.encoder_weights = str(tmp_path / "nope")
  with pytest.raises(EncoderWeightsError, match=f"{tmp_path / 'nope'} does not exist"):
    model_state.build(c)


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
  """A ViT-S/14 checkpoint from the official dinov2 code, saved the official way."""
  torch.manual_seed(0)
  model = dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
  path = tmp_path_factory.mktemp("pth") / "dinov2_vits14_pretrain.pth"
  torch.save(model.state_dict(), path)
  return str(path)


def test_official_pth_is_converted_once_and_cached(official_pth, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("DINOMALY_JAX_CACHE", str(tmp_path))
  c = _config(registers=0)
  c.encoder_weights = official_pth
  _, state, trained = model_state.build(c)
  assert not trained  # an encoder-only checkpoint: bottleneck and decoder are initialised
  assert "Converting" in capsys.readouterr().out
  cached = os.listdir(tmp_path)
  assert len(cached) == 1
  _, again, _ = model_state.build(c)
  assert "Converting" not in capsys.readouterr().out  # reused
  expected, _ = converted.load_encoder(os.path.join(tmp_path, cached[0]))
  for a, b in zip(jax.tree.leaves(state.encoder_params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.encoder_params), jax.tree.leaves(again.encoder_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The token embedding is the checkpoint's (not a random init).
  sd = torch.load(official_pth, weights_only=True)
  np.testing.assert_array_equal(np.asarray(state.encoder_params["cls_token"]).ravel(),
                                sd["cls_token"].numpy().ravel())


def test_weights_of_another_architecture_are_refused(official_pth, tmp_path, monkeypatch):
  monkeypatch.setenv("DINOMALY_JAX_CACHE", str(tmp_path))
  c = _config(registers=4)
  c.encoder_weights = official_pth
  with pytest.raises(EncoderWeightsError,
                     match="holds dinov2 ViT-small with 0 registers, but the config asks for dinov2 ViT-small "
                           "with 4"):
    model_state.build(c)
