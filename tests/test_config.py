"""Configs load, parse their arguments and reject bad values naming the field."""
import importlib
import subprocess
import sys

import pytest

from dinomaly_jax.config import defaults
from dinomaly_jax.config import validation
from dinomaly_jax.errors import ConfigError


def _config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", ["mvtec", "visa", "realiad", "folder", "demo"])
def test_every_config_validates(name):
  c = _config(name)
  c.data.root = c.data.root or "/data/somewhere"
  validation.validate(c)


def test_protocol_defaults():
  c = _config("realiad")
  assert (c.train.steps, c.model.bottleneck_dropout) == (50_000, 0.4)
  c = _config("realiad", "sep")
  assert (c.train.steps, c.model.bottleneck_dropout, c.data.class_separated) == (5_000, 0.2, True)
  c = _config("mvtec", "vit=large")
  assert c.model.target_layers == [4, 6, 8, 10, 12, 14, 16, 18]
  assert (c.train.lr, c.train.batch_size, c.data.resize, c.data.crop) == (2e-3, 16, 448, 392)


@pytest.mark.parametrize("name", ["mvtec", "visa", "realiad", "folder", "demo"])
@pytest.mark.parametrize("encoder", sorted(n for n in defaults.ENCODERS if n.startswith("dinov3")))
def test_every_config_validates_with_dinov3(name, encoder):
  c = _config(name, f"encoder={encoder}")
  c.data.root = c.data.root or "/data/somewhere"
  validation.validate(c)
  assert (c.model.family, c.model.registers) == ("dinov3", 4)


def test_encoder_presets():
  c = _config("mvtec")  # DINOv2; size and registers read from the weights at the start of a run
  assert (c.model.family, c.model.vit, c.model.registers, c.data.resize, c.data.crop) == (
      "dinov2", "auto", -1, 448, 392)
  c = _config("mvtec", "encoder=dinov3_vitl16")
  assert (c.model.vit, c.model.target_layers, c.model.fuse_groups) == (
      "large", [20, 21, 22, 23], [[0, 1], [2, 3]])
  assert (c.data.resize, c.data.crop, c.model.decoder_depth) == (512, 448, 8)
  assert _config("visa", "encoder=dinov3_vith16plus").model.target_layers == [28, 29, 30, 31]
  assert _config("realiad", "encoder=dinov3_vits16plus").model.vit == "small_plus"
  c = _config("folder", "encoder=dinov2_vits14")
  assert (c.model.family, c.model.vit, c.model.registers, c.model.target_layers) == (
      "dinov2", "small", 0, [2, 3, 4, 5, 6, 7, 8, 9])
  with pytest.raises(ValueError, match="encoder must be one of .*dinov3_vitb16"):
    _config("mvtec", "encoder=dinov3_vitx16")


def test_dinov3_fields_are_checked():
  c = _config("mvtec", "encoder=dinov3_vitb16")
  c.data.root = "/data/somewhere"
  for field, value, message in (
      ("data.crop", 392, "config.data.crop must be a multiple of the patch size 16 (dinov3), got 392"),
      ("model.vit", "giant", "config.model.vit must be one of ['small', 'small_plus', 'base', 'large', "
                             "'huge_plus'], got 'giant'"),
      ("model.registers", 0, "config.model.registers must be one of [4], got 0"),
      ("model.target_layers", [9, 10, 11, 12], "[0, 12) for dinov3 ViT-base")):
    bad = c.copy_and_resolve_references()
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(ConfigError) as e:
      validation.validate(bad)
    assert message in str(e.value)


def test_config_argument_errors():
  with pytest.raises(ValueError, match="Unknown config argument 'vitt'"):
    _config("mvtec", "vitt=small")
  with pytest.raises(ValueError, match="vit must be one of"):
    _config("mvtec", "vit=tiny")
  with pytest.raises(ValueError, match="'steps' must be a int"):
    defaults.parse_arg("steps=many", steps=3)


@pytest.mark.parametrize("field,value,message", [
    ("train.steps", -1, "config.train.steps must be a positive integer, got -1"),
    ("data.crop", 390, "config.data.crop must be a multiple of the patch size 14 (dinov2), got 390"),
    ("model.bottleneck_dropout", 1.5, "config.model.bottleneck_dropout must be a number in [0.0, 1.0)"),
    ("model.decoder_attention", "flash", "config.model.decoder_attention must be one of"),
    ("eval.gaussian_size", 4, "config.eval.gaussian_size must be an odd positive integer, got 4"),
    ("model.target_layers", [2, 3, 12], "config.model.target_layers must be distinct block indices in [0, 12)"),
])
def test_validation_names_the_field(field, value, message):
  c = _config("demo")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ConfigError) as e:
    validation.validate(c)
  assert message in str(e.value)


def test_missing_root_is_explained():
  c = _config("visa")
  with pytest.raises(ConfigError, match="config.data.root must be the dataset folder"):
    validation.validate(c)


def test_command_line_rejects_unknown_field(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dinomaly_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.train.stepz=3"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr


def test_command_line_rejects_bad_value_before_work(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dinomaly_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.train.steps=0"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "config.train.steps must be a positive integer, got 0" in proc.stderr
  assert not (tmp_path / "demo_data").exists()
