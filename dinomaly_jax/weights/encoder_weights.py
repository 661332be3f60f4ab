"""The frozen encoder's parameters: a converted directory, an official .pth, or random."""
import hashlib
import os
import shutil

import ml_collections

from dinomaly_jax import storage
from dinomaly_jax.config import defaults
from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.errors import EncoderWeightsError
from dinomaly_jax.weights import convert
from dinomaly_jax.weights import converted

HOW_TO_GET_WEIGHTS = (
    "set --config.encoder_weights to a directory from `python -m weight_conversion.convert "
    "--download vitb14_reg4 --out weights/dinov2_vitb14_reg4` (or --checkpoint FILE.pth), or to the "
    "official .pth itself (converted once and cached); DINOv3: download the official .pth or the "
    "Hugging Face facebook/dinov3-* model.safetensors yourself (Meta's license) and use it the same "
    "way; only the demo runs with random encoder weights (config.random_encoder=True).")


def load_pretrained(config: ml_collections.ConfigDict) -> dict:
  """The pretrained tree for `config`: {"encoder": ...} and, for a converted trained
  Dinomaly (ViTill) checkpoint, also "bottleneck" and "decoder". With
  config.random_encoder, {"encoder": None}: the train state initialises it from the seed."""
  if config.random_encoder:
    return {"encoder": None}
  try:
    tree, meta = converted.load_params(_converted_dir(config))
  except FileNotFoundError as e:
    raise EncoderWeightsError(f"config.encoder_weights: {e}") from None
  expected = (config.model.family, config.model.vit, config.model.registers)
  found = (meta.get("family", "dinov2"), meta.get("vit"), meta.get("registers"))  # older: DINOv2
  if found != expected:
    describe = lambda family, vit, registers: f"{family} ViT-{vit} with {registers} registers"
    raise EncoderWeightsError(
        f"config.encoder_weights: {config.encoder_weights} holds {describe(*found)}, but the "
        f"config asks for {describe(*expected)} (config.model.family, config.model.vit, "
        "config.model.registers; configs take encoder=NAME, e.g. encoder=dinov3_vitb16).")
  if "bottleneck" in tree:
    _check_bottleneck(config, meta)
  return tree


def _check_bottleneck(config: ml_collections.ConfigDict, meta: dict) -> None:
  """A trained checkpoint's bottleneck must be the config's (Dinomaly's MLP or Dinomaly2's two parts)."""
  found = int(meta.get("bottleneck_down_dim", 0))
  if found != config.model.bottleneck_down_dim:
    kind = (f"a trained Dinomaly2 checkpoint (two-part bottleneck, first width {found})" if found
            else "a trained Dinomaly checkpoint (one-MLP bottleneck)")
    raise EncoderWeightsError(
        f"config.encoder_weights: {config.encoder_weights} is {kind}, but "
        f"config.model.bottleneck_down_dim={config.model.bottleneck_down_dim}; evaluate it with "
        f"the config argument method={'dinomaly2' if found else 'dinomaly'}.")


def resolve_architecture(config: ml_collections.ConfigDict) -> None:
  """Fills config.model.vit = "auto" and registers = -1 from the encoder weights' meta.json,
  and an empty model.target_layers with the protocol's DINOv2 layers for that size (in place).

  Explicit values are left as they are; loading the weights checks them."""
  m = config.model
  if m.vit == defaults.AUTO_VIT or m.registers == defaults.AUTO_REGISTERS:
    if config.random_encoder:
      raise ConfigError("config.model.vit='auto' and config.model.registers=-1 are read from "
                        "config.encoder_weights; with config.random_encoder=True set them "
                        "(e.g. --config.model.vit=small --config.model.registers=0).")
    try:
      meta = converted.read_meta(_converted_dir(config))
    except FileNotFoundError as e:
      raise EncoderWeightsError(f"config.encoder_weights: {e}") from None
    family = meta.get("family", "dinov2")  # older conversions: DINOv2
    if family != m.family:
      raise EncoderWeightsError(
          f"config.encoder_weights: {config.encoder_weights} holds a {family} encoder, but "
          f"config.model.family is {m.family!r}; configs take encoder=NAME for another family "
          "(e.g. configs/mvtec.py:encoder=dinov3_vitb16).")
    if m.vit == defaults.AUTO_VIT:
      m.vit = meta["vit"]
    if m.registers == defaults.AUTO_REGISTERS:
      m.registers = meta["registers"]
  if not m.target_layers and m.vit in defaults.VIT_TARGET_LAYERS:
    m.target_layers = list(defaults.VIT_TARGET_LAYERS[m.vit])


def _converted_dir(config: ml_collections.ConfigDict) -> str:
  """config.encoder_weights as a converted directory (a PyTorch file is converted once)."""
  path = config.encoder_weights
  if not path:
    raise EncoderWeightsError(f"config.encoder_weights is empty: {HOW_TO_GET_WEIGHTS}")
  if not storage.exists(path):
    raise EncoderWeightsError(f"config.encoder_weights: {path} does not exist; {HOW_TO_GET_WEIGHTS}")
  return _convert_cached(path) if storage.isfile(path) else path


def _convert_cached(checkpoint: str) -> str:
  """Converts a PyTorch checkpoint (local or URL) once per host; later runs reuse the
  converted directory in the host's cache folder."""
  if storage.is_url(checkpoint):
    source = f"{checkpoint}:{storage.size(checkpoint)}"
  else:
    stat = os.stat(checkpoint)  # host-local: a local file's identity (size, time)
    source = f"{storage.absolute(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"
  key = hashlib.sha1(source.encode()).hexdigest()[:16]
  name = storage.basename(storage.normpath(checkpoint))
  out = storage.join(storage.local_cache_dir(), f"{name}-{key}")

  def convert_into(tmp: str) -> None:
    print(f"Converting {checkpoint} -> {out} (once; cached for later runs)", flush=True)
    local = checkpoint
    if storage.is_url(checkpoint):  # torch reads local files
      local = storage.join(tmp + "-download", name)
      storage.write_bytes(local, storage.read_bytes(checkpoint))
    try:
      tree, meta = convert.convert_file(local)
    except CheckpointError as e:
      raise EncoderWeightsError(f"config.encoder_weights: {e}") from None
    finally:
      if local != checkpoint:
        shutil.rmtree(storage.dirname(local), ignore_errors=True)  # host-local: a temporary download
    converted.save_host_copy(tmp, tree, meta)

  return storage.make_local_once(out, convert_into)
