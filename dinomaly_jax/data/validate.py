"""Checks every image and mask of an index before any training starts.

Reading headers and the last bytes of each file is cheap, so every file is checked: it
exists, is an image, is complete (PNG ends with IEND, JPEG with EOI; other formats and
files failing the quick test are fully decoded), and a mask has its image's size.
"""
from concurrent import futures

from PIL import Image

from dinomaly_jax import storage
from dinomaly_jax.data import transforms
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def _looks_complete(path: str, fmt: str | None) -> bool:
  if fmt == "PNG":
    return storage.read_tail(path, 64).endswith(_PNG_END)
  if fmt == "JPEG":
    return storage.read_tail(path, 64).rstrip(b"\x00\r\n ").endswith(_JPEG_END)
  return False


def check_image(path: str, what: str = "image") -> tuple[int, int]:
  """Returns (height, width) of a readable, complete image file; DataError otherwise."""
  if not storage.isfile(path):
    raise DataError(f"{path}: {what} file not found.")
  img = transforms.open_image(path)
  with img:
    size, fmt = (img.height, img.width), img.format
    if not _looks_complete(path, fmt):
      try:
        img.load()
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: {what} is truncated or corrupt ({e}); expected a complete "
                        "image file.") from None
  return size


def _check_record(r: Record) -> None:
  size = check_image(r.image_path)
  if r.mask_path is not None:
    mask_size = check_image(r.mask_path, "mask")
    if mask_size != size:
      raise DataError(f"{r.mask_path}: mask is {mask_size[1]}x{mask_size[0]} but its image "
                      f"{r.image_path} is {size[1]}x{size[0]}; expected the same size.")


def check_records(records: list[Record], threads: int = 16) -> None:
  """Raises the DataError of the first bad record (in record order), if any."""
  with futures.ThreadPoolExecutor(threads) as pool:
    for _ in pool.map(_check_record, records):
      pass
