"""Host-side input of prediction: image files of any size -> batches of one fixed shape.

Each image is decoded and resized on the host (threads; PIL releases the GIL) to the model's
input exactly as evaluation does (data.resize, centre crop data.crop, ImageNet
normalisation), and the last batch is padded, so the device runs one compiled shape whatever
the images' sizes and number. The next batch is prepared while the current one is scored.
"""
from concurrent import futures

import numpy as np

from dinomaly_jax.data import transforms


def _load(path: str, data_config) -> tuple[np.ndarray, np.ndarray]:
  """(original RGB uint8 (H, W, 3), model input float32 (crop, crop, 3))."""
  original = transforms.load_image(path)
  return original, transforms.preprocess_image(original, data_config)


def batches(paths: list[str], data_config, batch_size: int, threads: int = 4):
  """Yields (paths of the batch, their originals, images (batch_size, crop, crop, 3) float32);
  rows past the last image are zeros."""
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  with futures.ThreadPoolExecutor(threads) as pool:
    submit = lambda chunk: [pool.submit(_load, p, data_config) for p in chunk]
    pending = submit(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
      loaded = [f.result() for f in pending]
      pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
      yield chunk, [o for o, _ in loaded], pad(np.stack([x for _, x in loaded]), batch_size)


def pad(images: np.ndarray, batch_size: int) -> np.ndarray:
  """(n, ...) -> (batch_size, ...) with zero rows after the n images."""
  out = np.zeros((batch_size, *images.shape[1:]), images.dtype)
  out[:len(images)] = images
  return out
