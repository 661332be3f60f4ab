"""Scores sorted once for exact ranking metrics: packed uint64 keys walked in descending runs.

A key is the order-preserving bit pattern of a float32 score in the high 32 bits,
the pixel's 0/1 label in bit 31 and its flat index in the low 31 bits. Sorting these
keys (8 bytes per pixel, numpy's SIMD sort) is an order of magnitude faster than
`argsort` and gives the order, the labels and the indices. Walking them from the top
in chunks yields, for every pixel in descending score order, its index, its label
and whether it ends a run of equal scores: the points of a ROC/PR/PRO curve are
exactly the run ends (ties are one threshold, as in scikit-learn).
"""
from collections.abc import Iterator

import numpy as np

CHUNK = 1 << 22  # elements per step of key building and walking (32 MiB of keys)
_INDEX = np.uint64(0x7FFFFFFF)
_LABEL_SHIFT = np.uint64(31)
_SIGN = np.uint32(0x80000000)


def sorted_keys(scores: np.ndarray, labels: np.ndarray | None = None,
                name: str = "scores") -> np.ndarray:
  """Scores of any shape (labels of the same size, positive where > 0) -> (n,) sorted uint64 keys."""
  flat = np.asarray(scores).reshape(-1)
  flat_labels = None if labels is None else np.asarray(labels).reshape(-1)
  n = flat.size
  if n >= 2**31:
    raise ValueError(f"{name}: {n} values; at most 2**31 - 1 fit the packed sort keys.")
  keys = np.empty(n, np.uint64)
  for lo in range(0, n, CHUNK):
    hi = min(lo + CHUNK, n)
    chunk = flat[lo:hi].astype(np.float32, copy=False)
    if np.isnan(chunk).any():
      raise ValueError(f"{name} contain NaN (first at flat index "
                       f"{lo + int(np.flatnonzero(np.isnan(chunk))[0])}); scores must be numbers.")
    keys[lo:hi] = (_ordered(chunk).astype(np.uint64) << np.uint64(32)) | np.arange(lo, hi, dtype=np.uint64)
    if flat_labels is not None:
      keys[lo:hi] |= (flat_labels[lo:hi] > 0).astype(np.uint64) << _LABEL_SHIFT
  keys.sort()
  return keys


def _ordered(values: np.ndarray) -> np.ndarray:
  """float32 -> uint32 with the same order (after -0.0 -> +0.0)."""
  bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.uint32)
  return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def count_above(keys: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """(T,) int64: how many keyed float32 scores are > each float64 threshold (numpy's comparison)."""
  t = np.asarray(thresholds, np.float64)
  below = t.astype(np.float32)  # the largest float32 <= t: s > t  <=>  s > below
  below = np.where(below > t, np.nextafter(below, np.float32(-np.inf)), below)
  bounds = (_ordered(below).astype(np.uint64) + np.uint64(1)) << np.uint64(32)
  return keys.size - np.searchsorted(keys, bounds, side="left")


def key_values(ordered: np.ndarray) -> np.ndarray:
  """Inverse of the key's score bits: (m,) uint32 -> (m,) float32."""
  ordered = np.asarray(ordered, np.uint32)
  bits = np.where(ordered & _SIGN, ordered & ~_SIGN, ~ordered)
  return bits.view(np.float32)


def descending_runs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
  """Yields (index (m,) int64, label (m,) bool, run_end (m,) bool, ordered (m,) uint32), highest first.

  run_end[i] is True where the next lower pixel has a different score (or none is left).
  """
  n, chunk = keys.size, CHUNK
  for hi in range(n, 0, -chunk):
    lo = max(0, hi - chunk)
    block = keys[lo:hi][::-1]
    ordered = (block >> np.uint64(32)).astype(np.uint32)
    run_end = np.empty(block.size, bool)
    run_end[:-1] = ordered[:-1] != ordered[1:]
    run_end[-1] = lo == 0 or ordered[-1] != np.uint32(keys[lo - 1] >> np.uint64(32))
    label = ((block >> _LABEL_SHIFT) & np.uint64(1)).astype(bool)
    yield (block & _INDEX).astype(np.int64), label, run_end, ordered
