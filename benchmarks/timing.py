"""Timing, memory and machine facts for the benchmarks."""
import ctypes
import datetime
import platform
import statistics
import threading
import time

import jax
import psutil


class PeakRss:
  """Samples this process's resident memory every `interval` s while active."""

  def __init__(self, interval: float = 0.005):
    self._interval = interval
    self._process = psutil.Process()
    self._peak = 0
    self._active = threading.Event()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def _sample(self):
    while not self._stop.is_set():
      if self._active.wait(0.05):
        self._peak = max(self._peak, self._process.memory_info().rss)
        time.sleep(self._interval)

  def measure(self, fn):
    """Runs fn() while sampling; returns (result, peak RSS growth in bytes during the call).

    Freed heap memory is first returned to the OS (glibc malloc_trim), so that the
    growth counts what the call itself needs rather than what earlier calls left.
    """
    _malloc_trim()
    before = self._process.memory_info().rss
    self._peak = before
    self._active.set()
    try:
      result = fn()
    finally:
      self._active.clear()
    return result, max(self._peak, self._process.memory_info().rss) - before

  def close(self):
    self._stop.set()
    self._active.set()
    self._thread.join()


def _malloc_trim():
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def interleaved_times(fns: dict, repeats: int) -> dict:
  """Calls each (already warm) fn `repeats` times, alternating between them so that
  load from other processes hits all alike; returns each fn's list of seconds."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def interleaved_seconds(fns: dict, repeats: int) -> dict:
  """The median seconds per call of interleaved_times."""
  return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats).items()}


def device_peak_bytes():
  """Peak bytes in use on the first accelerator (None on CPU, where RSS is used)."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_facts() -> dict:
  """Date, hardware and library versions, for the results file."""
  import flax  # pylint: disable=g-import-not-at-top
  facts = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cpu": cpu_model(),
      "cpu_cores": psutil.cpu_count(logical=True),
      "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
      "jax_backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top
    facts["torch"] = torch.__version__
  except ImportError:
    pass
  return facts


def matmul_gflops(with_torch: bool, n: int = 1024, repeats: int = 5) -> dict:
  """float32 GFLOP/s of one (n x n) @ (n x n) matmul in JAX (and torch): context for ratios."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  ja = jnp.asarray(a)
  dot = jax.jit(jnp.dot)
  fns = {"jax": lambda: dot(ja, ja).block_until_ready()}
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    ta = torch.from_numpy(a)
    fns["torch"] = lambda: ta @ ta
  for fn in fns.values():
    fn()
  seconds = interleaved_seconds(fns, repeats)
  return {name: round(2 * n**3 / s / 1e9, 1) for name, s in seconds.items()}


def write_results(path, results: list) -> None:
  """Writes {"machine": machine_facts(), "results": results} as JSON to `path`."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(machine=machine_facts(), results=results), indent=2))
  print(f"Wrote {out}")
