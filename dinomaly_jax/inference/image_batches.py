"""Host-side input of prediction: image files of any size -> batches of one fixed shape.

Each image is decoded and resized on the host (threads; PIL releases the GIL) to the model's
input exactly as evaluation does (data.resize, centre crop data.crop, ImageNet
normalisation), and the last batch is padded, so the device runs one compiled shape whatever
the images' sizes and number. Back-pressure: the next batch is decoded while the current one
is scored, and no further: a consumer that stops pulling (its writers are behind) stops the
decoding, so at most two batches of decoded images are alive. An image that cannot be read
is not an abort: its row of the batch is zeros and `errors` names what went wrong.
"""
from concurrent import futures
import dataclasses

import numpy as np

from dinomaly_jax.data import transforms


@dataclasses.dataclass
class Batch:
  paths: list[str]
  originals: list  # RGB uint8 (H, W, 3) per image when kept, else None; None for unreadable images
  sizes: list  # (H, W) of each original; None for unreadable images
  errors: list  # "" or the reason the image could not be read
  images: np.ndarray  # (batch_size, crop, crop, 3) float32; zero rows past the end and for errors


def _load(path: str, data_config, keep_original: bool):
  """(original or None, (H, W), model input (crop, crop, 3) float32, error)."""
  try:
    original = transforms.load_image(path, data_config)
    return (original if keep_original else None), original.shape[:2], \
        transforms.preprocess_image(original, data_config), ""
  except Exception as e:  # pylint: disable=broad-except  (one bad file is one row, never an abort)
    return None, None, None, str(e) if str(e).startswith(str(path)) else f"{path}: {type(e).__name__}: {e}"


def batches(paths: list[str], data_config, batch_size: int, *, keep_originals: bool = True,
            threads: int = 4):
  """Yields a Batch per batch_size paths, decoding the next batch while the caller has this one."""
  crop = int(data_config.crop)
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  with futures.ThreadPoolExecutor(threads) as pool:
    submit = lambda chunk: [pool.submit(_load, p, data_config, keep_originals) for p in chunk]
    pending = submit(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
      loaded = [f.result() for f in pending]
      pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
      images = np.zeros((batch_size, crop, crop, 3), np.float32)
      for i, (_, _, x, _) in enumerate(loaded):
        if x is not None:
          images[i] = x
      yield Batch(chunk, [o for o, _, _, _ in loaded], [s for _, s, _, _ in loaded],
                  [e for _, _, _, e in loaded], images)
      del loaded


def pad(images: np.ndarray, batch_size: int) -> np.ndarray:
  """(n, ...) -> (batch_size, ...) with zero rows after the n images."""
  out = np.zeros((batch_size, *images.shape[1:]), images.dtype)
  out[:len(images)] = images
  return out
