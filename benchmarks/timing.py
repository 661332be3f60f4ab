"""Timing statistics, thread pinning and machine facts for the benchmarks.

Every figure is a list of timed calls after a warm-up call; it is summarised by its
median and its min-max range. A ratio is a ratio of medians; its range runs from the
least to the most favourable pairing of the two ranges, and when the two ranges overlap
the ratio is marked "within noise".
"""
import datetime
import os
import platform
import resource
import statistics
import time

MIN_REPEATS = 5  # timed calls per figure (after one warm-up call), except --quick runs


def thread_env(threads: int) -> dict:
  """Environment for a fresh process whose JAX (XLA) and torch use `threads` threads.

  The process is also confined to `threads` cores (see `pin_process`): XLA sizes its
  thread pool from the cores it may run on and has no flag that limits it, so the
  affinity is what holds JAX to the count; torch is pinned in that process with
  torch.set_num_threads (see pin_torch_threads)."""
  env = dict(os.environ)
  env["BENCH_THREADS"] = str(threads)
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[name] = str(threads)
  return env


def pin_process(threads: int) -> None:
  """Confines the calling process (before it starts JAX or torch) to its first `threads`
  allowed cores."""
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(allowed):
    raise ValueError(f"threads={threads}: this process may use {len(allowed)} cores.")
  os.sched_setaffinity(0, allowed[:threads])


def cpu_seconds() -> float:
  """CPU time of this process so far, all its threads (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def pin_torch_threads(threads: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)


def load_average() -> float:
  """The 1-minute load average (runnable processes; > cores means a busy machine)."""
  return round(os.getloadavg()[0], 2)


def timed_calls(fn, repeats: int) -> tuple[list, list]:
  """Calls the (already warm) fn `repeats` times: (wall seconds, process CPU seconds) per
  call (CPU / wall = the cores the call kept busy)."""
  wall, cpu = [], []
  for _ in range(repeats):
    cpu_start, start = cpu_seconds(), time.perf_counter()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(cpu_seconds() - cpu_start)
  return wall, cpu


def summary(seconds) -> dict:
  """{"median", "min", "max", "n"} of a list of seconds."""
  return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
          "n": len(seconds)}


def ratio(baseline: dict, ours: dict) -> dict:
  """baseline time / our time from two summaries: median ratio, its range, and whether
  the two time ranges overlap ("within noise": the ranking is not established)."""
  return {"median": baseline["median"] / ours["median"],
          "low": baseline["min"] / ours["max"], "high": baseline["max"] / ours["min"],
          "within_noise": baseline["min"] <= ours["max"] and ours["min"] <= baseline["max"]}


def fmt_seconds(s: dict) -> str:
  return f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]"


def fmt_ratio(r: dict) -> str:
  text = f"{r['median']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]"
  return text + (" within noise" if r["within_noise"] else "")


def device_peak_bytes():
  """Peak bytes in use on the first accelerator (None on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def status_bytes(field: str, pid="self") -> int | None:
  """A memory field of Linux's /proc/<pid>/status (VmRSS: resident now, VmHWM: its peak), in
  bytes; None once the process has exited."""
  try:
    with open(f"/proc/{pid}/status") as f:
      lines = f.readlines()
  except OSError:
    return None
  for line in lines:
    if line.startswith(f"{field}:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not in /proc/{pid}/status")


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
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
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


def matmul_gflops(framework: str, n: int = 1024, repeats: int = MIN_REPEATS) -> float:
  """float32 GFLOP/s (median) of one (n x n) @ (n x n) matmul in "jax" or "torch": the
  machine's practical peak at the current thread count."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  if framework == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ja, dot = jnp.asarray(a), jax.jit(jnp.dot)
    fn = lambda: dot(ja, ja).block_until_ready()
  else:
    import torch  # pylint: disable=g-import-not-at-top
    ta = torch.from_numpy(a)
    fn = lambda: ta @ ta
  fn()
  wall, _ = timed_calls(fn, repeats)
  return round(2 * n**3 / statistics.median(wall) / 1e9, 1)


def write_results(path, results: list) -> None:
  """Writes {"machine": machine_facts(), "results": results} as JSON to `path`."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(machine=machine_facts(), results=results), indent=2))
  print(f"Wrote {out}")
