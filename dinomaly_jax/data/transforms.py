"""Decode, resize, crop and normalise images and masks exactly as the reference does.

Reference (Dinomaly `dataset.get_data_transforms`): images go through torchvision
`Resize((448, 448))` on a PIL image, `ToTensor`, `CenterCrop(392)` and ImageNet
`Normalize`; masks through `Resize((448, 448))`, `CenterCrop(392)`, `ToTensor`, then the
eval loop resizes them with torch `interpolate(mode="nearest")` to 256 and takes > 0
(our masks also keep which pixels are >= 0.5, the other common convention).

torchvision's `Resize` on a PIL image calls `PIL.Image.resize(size, BILINEAR)` (PIL's
bilinear filter is antialiased: its support widens when it downscales). torchvision is
not installable beside the CPU torch build here, so we call PIL directly, which gives the
same bytes. PIL resizes "1" and "P" mode masks with NEAREST; we resize masks in their own
mode like the reference. Non-square images are squashed to resize x resize (no aspect
ratio kept), as in the reference.
"""
import dataclasses
import io
import math
import struct
import sys

import numpy as np
from PIL import Image

from dinomaly_jax import storage
from dinomaly_jax.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The sizes of data_config (a small picklable copy for worker processes)."""
  resize: int
  crop: int
  mask_size: int

  @classmethod
  def of(cls, data_config) -> "Sizes":
    return cls(int(data_config.resize), int(data_config.crop), int(data_config.mask_size))


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How files are decoded (a small picklable copy of data_config's fields for workers).

  bit_depth: the bits a 16-bit grayscale image really uses (0 = from the file: a PNG's sBIT
    chunk or a TIFF's MaxSampleValue, else 16); values are scaled by 255 / (2^bits - 1).
  max_image_pixels: PIL's decompression-bomb limit (0 = PIL's default, about 89 million
    pixels, refused above twice that; -1 = no limit).
  """
  bit_depth: int = 0
  max_image_pixels: int = 0

  @classmethod
  def of(cls, data_config) -> "Decoding":
    if data_config is None:
      return cls()
    return cls(int(data_config.get("bit_depth", 0)), int(data_config.get("max_image_pixels", 0)))


_PIL_DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def _set_pixel_limit(decoding: Decoding) -> None:
  limit = decoding.max_image_pixels
  Image.MAX_IMAGE_PIXELS = _PIL_DEFAULT_MAX_PIXELS if limit == 0 else (None if limit < 0 else limit)


def open_image(path: str, decoding: Decoding = Decoding()) -> Image.Image:
  """Opens an image file lazily (header only); DataError if it is not an image."""
  _set_pixel_limit(decoding)
  try:
    if storage.is_url(path):
      return Image.open(io.BytesIO(storage.read_bytes(path)))
    return Image.open(path)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found.") from None
  except Image.DecompressionBombError as e:
    raise DataError(f"{path}: cannot be read as an image ({e}); to allow images this large set "
                    "config.data.max_image_pixels (-1 = no limit).") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot be read as an image ({e}).") from None


def _png_sbit(data: bytes) -> int | None:
  """The significant bits of a grayscale PNG's sBIT chunk (None without one)."""
  pos = 8
  while pos + 8 <= len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    if kind == b"sBIT" and length >= 1:
      return data[pos + 8]
    if kind in (b"IDAT", b"IEND"):
      return None
    pos += 12 + length
  return None


def significant_bits(img: Image.Image, path: str) -> int:
  """The bits a 16-bit image uses, from its file: PNG sBIT, TIFF MaxSampleValue, else 16."""
  if img.format == "PNG":
    bits = _png_sbit(storage.read_bytes(path)[:1 << 16])
    return bits if bits and 1 <= bits <= 16 else 16
  if img.format == "TIFF":
    max_value = img.tag_v2.get(281)  # MaxSampleValue
    if isinstance(max_value, tuple):
      max_value = max(max_value)
    if max_value:
      return max(1, min(16, int(max_value).bit_length()))
  return 16


_WARNED_DEPTH = []  # once per process


def _scale_sixteen_bit(values: np.ndarray, bits: int, path: str, from_file: bool) -> np.ndarray:
  """Grey values of `bits` bits -> uint8, 255 = 2^bits - 1 (rounded; values above clip)."""
  top = float((1 << bits) - 1)
  if from_file and bits == 16 and values.max(initial=0) < 4096 and not _WARNED_DEPTH:
    _WARNED_DEPTH.append(path)
    print(f"warning: {path}: a 16-bit image whose values stay below 4096 (10- or 12-bit camera "
          "data?); it is scaled as 16-bit. Set config.data.bit_depth (e.g. 12) to use its real range.",
          file=sys.stderr, flush=True)
  return np.round(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8)


def to_rgb(img: Image.Image, decoding: Decoding = Decoding(), path: str = "") -> np.ndarray:
  """PIL image of any mode -> RGB uint8 (H, W, 3).

  16-bit grayscale is scaled by its real bit depth (Decoding.bit_depth, else the file's
  sBIT / MaxSampleValue, else 16 bits): 255 is 2^bits - 1, so a 12-bit image keeps 256 grey
  levels. Every other mode goes through PIL's `convert("RGB")` like the reference
  (palette colours looked up, alpha dropped, grayscale replicated; PIL reads 16-bit RGB
  PNGs as 8-bit).
  """
  if img.mode in _SIXTEEN_BIT_MODES:
    from_file = not decoding.bit_depth
    bits = decoding.bit_depth or (significant_bits(img, path) if path else 16)
    gray = _scale_sixteen_bit(np.asarray(img, np.int64), bits, path, from_file)
    return np.repeat(gray[..., None], 3, axis=-1)
  if img.mode == "F":
    raise DataError(f"{img.filename}: floating-point images are not supported; "
                    "expected an 8- or 16-bit image (PNG, JPEG, BMP, TIFF).")
  return np.asarray(img.convert("RGB"))


def load_image(path: str, data_config=None) -> np.ndarray:
  """Decodes an image file to RGB uint8 (H, W, 3); DataError naming the file on failure.

  data_config (or a Decoding): the bit depth of 16-bit images and the pixel limit."""
  decoding = data_config if isinstance(data_config, Decoding) else Decoding.of(data_config)
  img = open_image(path, decoding)
  try:
    with img:
      return to_rgb(img, decoding, path)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"{path}: image is truncated or corrupt ({e}).") from None


def crop_offset(size: int, crop: int) -> int:
  """torchvision CenterCrop's top/left offset."""
  return int(round((size - crop) / 2.0))


def center_crop(x: np.ndarray, crop: int) -> np.ndarray:
  top, left = crop_offset(x.shape[0], crop), crop_offset(x.shape[1], crop)
  return x[top:top + crop, left:left + crop]


def resize_image(rgb: np.ndarray, resize: int) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> (resize, resize, 3) uint8, PIL bilinear."""
  return np.asarray(Image.fromarray(rgb).resize((resize, resize), Image.BILINEAR))


def normalize_crop(resized: np.ndarray, crop: int) -> np.ndarray:
  """uint8 (R, R, 3) -> float32 (crop, crop, 3): centre crop, /255, ImageNet mean/std."""
  x = center_crop(resized, crop).astype(np.float32) / np.float32(255)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def augment_crop(resized: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
  """Dinomaly2 few-shot's training augmentation of a (R, R, 3) uint8 image -> float32 (crop, crop, 3).

  torchvision RandomResizedCrop((crop, crop), scale=(s, s), ratio=(0.95, 1.05)) with
  s = (crop / R)^2 (a window of the centre crop's area, aspect ratio log-uniform, placed
  uniformly, resized bilinearly to crop x crop), then a rotation by a uniform multiple of
  90 degrees (counter-clockwise), a horizontal and a vertical flip each with probability 0.5,
  /255 and ImageNet mean/std.
  """
  size = resized.shape[0]
  ratio = math.exp(rng.uniform(math.log(0.95), math.log(1.05)))
  w = min(size, int(round(math.sqrt(crop * crop * ratio))))
  h = min(size, int(round(math.sqrt(crop * crop / ratio))))
  top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
  window = resized[top:top + h, left:left + w]
  if (h, w) != (crop, crop):
    window = np.asarray(Image.fromarray(window).resize((crop, crop), Image.BILINEAR))
  window = np.rot90(window, k=int(rng.integers(0, 4)))
  if rng.random() < 0.5:
    window = window[:, ::-1]
  if rng.random() < 0.5:
    window = window[::-1]
  x = np.ascontiguousarray(window).astype(np.float32) / np.float32(255)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def preprocess_image(rgb: np.ndarray, data_config) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> the model input float32 (crop, crop, 3)."""
  s = Sizes.of(data_config)
  return normalize_crop(resize_image(rgb, s.resize), s.crop)


# Ground-truth masks carry both conventions in one uint8 array: 0 = background,
# MASK_POSITIVE = > 0 after the bilinear resize only (the reference's convention, as
# published), MASK_HALF = also >= half the mask's full value (the ">= 0.5" convention).
MASK_POSITIVE = 1
MASK_HALF = 2


def _at_least_half(resized: np.ndarray, mode: str) -> np.ndarray:
  if resized.dtype == bool or mode == "P":  # "1" and palette masks: no grey levels
    return resized > 0
  return resized >= (32768 if mode in _SIXTEEN_BIT_MODES else 128)


def resize_mask(path: str, image_size: tuple[int, int], resize: int) -> np.ndarray:
  """Mask file -> uint8 (resize, resize) levels in {0, MASK_POSITIVE, MASK_HALF}.

  Resized in its own mode; `> 0` is the reference's ground truth, `>= MASK_HALF` the
  ">= 0.5" one.

  Args:
    path: the mask file (any mode; multi-channel masks count a pixel if any channel > 0).
    image_size: (height, width) of its image; a mask of another size is a DataError.
    resize: the resize side.
  """
  img = open_image(path)
  with img:
    if (img.height, img.width) != tuple(image_size):
      raise DataError(f"{path}: mask is {img.width}x{img.height} but its image is "
                      f"{image_size[1]}x{image_size[0]}; expected the same size.")
    try:
      resized = np.asarray(img.resize((resize, resize), Image.BILINEAR))
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(f"{path}: mask is truncated or corrupt ({e}).") from None
    mode = img.mode
  positive, half = resized > 0, _at_least_half(resized, mode)
  if positive.ndim == 3:
    positive, half = positive.any(axis=-1), half.any(axis=-1)
  return positive.astype(np.uint8) + half.astype(np.uint8)


def load_resized(image_path: str, mask_path: str | None, resize: int, decoding: Decoding = Decoding()):
  """An image and its mask (None = all zero) resized: uint8 (R, R, 3) and (R, R) mask levels."""
  rgb = load_image(image_path, decoding)
  if mask_path is None:
    mask = np.zeros((resize, resize), np.uint8)
  else:
    mask = resize_mask(mask_path, rgb.shape[:2], resize)
  return resize_image(rgb, resize), mask


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of torch `interpolate(mode="nearest")`: floor(dst * float32(in/out))."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def finish_mask(mask: np.ndarray, crop: int, mask_size: int) -> np.ndarray:
  """uint8 (R, R) mask levels -> (mask_size, mask_size) uint8: centre crop, nearest resize."""
  idx = nearest_indices(crop, mask_size)
  return center_crop(mask, crop)[idx][:, idx]


def preprocess_mask(path: str | None, image_size: tuple[int, int], data_config) -> np.ndarray:
  """Mask file (or None = normal image) -> uint8 (mask_size, mask_size) levels (see MASK_HALF)."""
  s = Sizes.of(data_config)
  if path is None:
    return np.zeros((s.mask_size, s.mask_size), np.uint8)
  return finish_mask(resize_mask(path, image_size, s.resize), s.crop, s.mask_size)


def display_image(resized: np.ndarray, data_config, size: int) -> np.ndarray:
  """The region the model sees (centre crop of the (resize, resize, 3) uint8 image a
  reader returns) as RGB uint8 (size, size, 3) for pictures."""
  crop = center_crop(resized, Sizes.of(data_config).crop)
  return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
