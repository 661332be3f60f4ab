"""Image and mask transforms against direct PIL + torch computations of the reference chain."""
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from dinomaly_jax.config import defaults
from dinomaly_jax.data import transforms


@pytest.fixture(name="data_config")
def fixture_data_config():
  return defaults.base_config().data  # protocol sizes 448 / 392 / 256


def _torch_reference_image(path):
  """torchvision's Resize((448, 448)) on PIL = PIL bilinear; ToTensor; CenterCrop; Normalize."""
  resized = np.asarray(Image.open(path).convert("RGB").resize((448, 448), Image.BILINEAR))
  x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)[:, 28:420, 28:420]
  mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  return x.sub(mean).div(std).permute(1, 2, 0).numpy()


def _torch_reference_mask(path, level=0.0):
  """Resize((448, 448)) on the PIL mask, CenterCrop(392), ToTensor, nearest to 256, > level."""
  resized = np.asarray(Image.open(path).resize((448, 448), Image.BILINEAR))[28:420, 28:420]
  t = torch.from_numpy(resized.astype(np.float32) / 255)[None, None]
  return (F.interpolate(t, size=256, mode="nearest")[0, 0] > level).numpy().astype(np.uint8)


def test_image_matches_reference_chain_exactly(tmp_path, data_config):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path)  # non-square
  ours = transforms.preprocess_image(transforms.load_image(path), data_config)
  assert ours.shape == (392, 392, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, _torch_reference_image(path))  # bit-exact (max err 0)


def test_mask_matches_reference_chain_exactly(tmp_path, data_config):
  rng = np.random.default_rng(1)
  mask = np.zeros((375, 500), np.uint8)
  for _ in range(6):  # rectangles with sharp edges
    y, x = rng.integers(0, 350, 2)
    mask[y:y + rng.integers(1, 40), x:x + rng.integers(1, 60)] = 255
  path = str(tmp_path / "m.png")
  Image.fromarray(mask).save(path)
  ours = transforms.preprocess_mask(path, (375, 500), data_config)
  assert ours.shape == (256, 256) and ours.dtype == np.uint8 and set(np.unique(ours)) == {0, 1, 2}
  np.testing.assert_array_equal(ours > 0, _torch_reference_mask(path))  # the reference's > 0
  # The >= 0.5 convention (uint8 >= 128 is ToTensor's value >= 0.5; 127.5 is not reachable).
  np.testing.assert_array_equal(ours >= transforms.MASK_HALF, _torch_reference_mask(path, 127 / 255))
  assert (ours >= 2).sum() < (ours > 0).sum()  # the bilinear edges differ


@pytest.mark.parametrize("n_in,n_out", [(392, 256), (56, 32), (100, 37), (37, 100), (64, 64)])
def test_nearest_indices_match_torch(n_in, n_out):
  t = torch.arange(n_in, dtype=torch.float32)[None, None, :, None].expand(1, 1, n_in, 1)
  expected = F.interpolate(t, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
  np.testing.assert_array_equal(transforms.nearest_indices(n_in, n_out), expected)


def test_multichannel_mask_counts_any_channel(tmp_path, data_config):
  mask = np.zeros((300, 300, 3), np.uint8)
  mask[100:200, 100:200, 2] = 255
  path = str(tmp_path / "rgb_mask.png")
  Image.fromarray(mask).save(path)
  ours = transforms.preprocess_mask(path, (300, 300), data_config)
  gray = str(tmp_path / "gray_mask.png")
  Image.fromarray(mask[..., 2]).save(gray)
  np.testing.assert_array_equal(ours, transforms.preprocess_mask(gray, (300, 300), data_config))
  assert ours.sum() > 0


def test_missing_mask_is_all_zero(data_config):
  np.testing.assert_array_equal(transforms.preprocess_mask(None, (10, 10), data_config),
                                np.zeros((256, 256), np.uint8))


def test_grayscale_rgba_palette_and_16bit_convert(tmp_path):
  rng = np.random.default_rng(2)
  gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "l.png")
  np.testing.assert_array_equal(transforms.load_image(str(tmp_path / "l.png")),
                                np.repeat(gray[..., None], 3, -1))

  rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(transforms.load_image(str(tmp_path / "rgba.png")), rgba[..., :3])

  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  indices = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  p = Image.fromarray(indices, "P")
  p.putpalette(palette.ravel().tolist())
  p.save(tmp_path / "p.png")
  np.testing.assert_array_equal(transforms.load_image(str(tmp_path / "p.png")), palette[indices])

  sixteen = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
  Image.fromarray(sixteen).save(tmp_path / "i16.png")
  loaded = transforms.load_image(str(tmp_path / "i16.png"))
  assert loaded.dtype == np.uint8 and loaded.shape == (20, 30, 3)
  np.testing.assert_array_equal(loaded[..., 0], np.round(sixteen * (255 / 65535)).astype(np.uint8))


def _png_with_sbit(path, values, bits):
  """A 16-bit grayscale PNG carrying an sBIT chunk (significant bits) before its data."""
  import struct
  import zlib
  Image.fromarray(values).save(path)
  data = open(path, "rb").read()
  at = data.index(b"IDAT") - 4  # the IDAT chunk's length field
  body = b"sBIT" + bytes([bits])
  chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
  open(path, "wb").write(data[:at] + chunk + data[at:])


def test_sixteen_bit_images_keep_their_real_bit_depth(tmp_path, capsys):
  twelve = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit level once
  expected = np.round(twelve * (255 / 4095)).astype(np.uint8)
  _png_with_sbit(tmp_path / "sbit.png", twelve, 12)  # the file says 12 bits
  loaded = transforms.load_image(str(tmp_path / "sbit.png"))[..., 0]
  np.testing.assert_array_equal(loaded, expected)
  assert len(np.unique(loaded)) == 256  # was 16 grey levels when the top 8 of 16 bits were kept
  Image.fromarray(twelve).save(tmp_path / "plain.png")  # no sBIT: a configured depth
  config = defaults.base_config().data
  config.bit_depth = 12
  np.testing.assert_array_equal(transforms.load_image(str(tmp_path / "plain.png"), config)[..., 0], expected)
  transforms._WARNED_DEPTH.clear()
  as_sixteen = transforms.load_image(str(tmp_path / "plain.png"))[..., 0]  # unknown: 16 bits, and a warning
  assert as_sixteen.max() == round(4095 * 255 / 65535)
  assert "Set config.data.bit_depth (e.g. 12)" in capsys.readouterr().err


def test_very_large_images_are_allowed_by_a_config_field(tmp_path):
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
  config = defaults.base_config().data
  config.max_image_pixels = 100  # 1,600 pixels is over twice the limit: PIL refuses
  try:
    with pytest.raises(transforms.DataError, match="set config.data.max_image_pixels"):
      transforms.load_image(str(tmp_path / "big.png"), config)
    config.max_image_pixels = -1
    assert transforms.load_image(str(tmp_path / "big.png"), config).shape == (40, 40, 3)
  finally:
    transforms.load_image(str(tmp_path / "big.png"))  # PIL's default limit back
  assert Image.MAX_IMAGE_PIXELS == transforms._PIL_DEFAULT_MAX_PIXELS


def test_display_image_is_the_cropped_view(data_config):
  rgb = np.random.default_rng(3).integers(0, 256, (100, 80, 3), dtype=np.uint8)
  resized = transforms.resize_image(rgb, 448)  # what a reader returns
  shown = transforms.display_image(resized, data_config, 256)
  crop = transforms.center_crop(resized, 392)
  np.testing.assert_array_equal(shown, np.asarray(Image.fromarray(crop).resize((256, 256), Image.BILINEAR)))
