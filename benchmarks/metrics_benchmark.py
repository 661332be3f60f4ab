"""Time and peak memory of the seven metrics, and of AUPRO against the direct computation.

  python -m benchmarks.metrics_benchmark [--images 1000] [--direct_images 50]

Each case runs in a fresh process on a generated class (blob masks on ~60% of the
images, smooth maps). Wall and CPU seconds are both given (CPU time is robust to
other load on the machine). Peak memory is the process's peak RSS during the call above
its RSS before it (Linux VmHWM, reset through /proc/self/clear_refs), i.e. what the
metrics add on top of the maps and masks they are given. Results are printed and
written to benchmarks/results/metrics_<date>.json.
"""
import argparse
import datetime
import json
import multiprocessing
import os
import platform
import time

import numpy as np

from benchmarks import direct_aupro
from benchmarks import timing

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def generate(n: int, size: int, seed: int = 0):
  """(n, size, size) float32 maps, uint8 masks, (n,) scores and labels of a synthetic class."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.6).astype(np.int32)
  cell = 8
  coarse = rng.standard_normal((n, size // cell, size // cell)).astype(np.float32)
  blobs = np.repeat(np.repeat(coarse > 1.6, cell, axis=1), cell, axis=2)  # several regions each
  masks = (blobs & labels[:, None, None].astype(bool)).astype(np.uint8)
  maps = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2) * np.float32(0.1)
  maps += rng.random((n, size, size), dtype=np.float32) * np.float32(0.5) + masks * np.float32(0.15)
  scores = maps.reshape(n, -1).max(axis=1)
  return scores, labels, maps, masks


def _case(args):
  """Runs one case in this (fresh) process: (wall s, CPU s, extra peak bytes, value)."""
  name, n, size = args
  from dinomaly_jax.evaluation import aupro  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  scores, labels, maps, masks = generate(n, size)
  calls = {
      "seven metrics (AUPRO reference)": lambda: metrics.class_metrics(scores, labels, maps, masks)["AUPRO"],
      "seven metrics (AUPRO mvtec)": lambda: metrics.class_metrics(
          scores, labels, maps, masks, aupro="mvtec")["AUPRO"],
      "AUPRO reference, vectorised": lambda: aupro.aupro_reference(maps, masks > 0),
      "AUPRO reference, direct per threshold": lambda: _direct(maps, masks > 0),
  }
  base = timing.status_bytes("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS
  start, cpu_start = time.perf_counter(), time.process_time()
  value = calls[name]()
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  return seconds, cpu_seconds, timing.status_bytes("VmHWM") - base, float(value)


def _direct(maps, masks):
  return direct_aupro.direct_reference_aupro(maps, masks, 0.3, 200)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--direct_images", type=int, default=50,
                      help="images for the (slow) direct AUPRO and its vectorised twin; 0 skips them")
  args = parser.parse_args()
  cases = [("seven metrics (AUPRO reference)", args.images), ("seven metrics (AUPRO mvtec)", args.images),
           ("AUPRO reference, vectorised", args.images)]
  if args.direct_images:
    cases += [("AUPRO reference, vectorised", args.direct_images),
              ("AUPRO reference, direct per threshold", args.direct_images)]
  ctx = multiprocessing.get_context("spawn")
  rows = []
  for name, n in cases:
    with ctx.Pool(1) as pool:
      seconds, cpu_seconds, peak, value = pool.apply(_case, ((name, n, args.size),))
    rows.append({"case": name, "images": n, "pixels": n * args.size**2, "wall_s": round(seconds, 3),
                 "cpu_s": round(cpu_seconds, 3), "peak_extra_gib": round(peak / 2**30, 3),
                 "aupro": value})
    print(f"{name:40s} {n:5d} x {args.size}^2  wall {seconds:7.2f} s  cpu {cpu_seconds:7.2f} s  "
          f"+{peak / 2**30:5.2f} GiB  AUPRO {value:.6f}", flush=True)
  with open("/proc/cpuinfo") as f:
    cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.machine())
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "cpu": cpu, "cpu_cores": os.cpu_count(), "load_average": os.getloadavg(),
         "numpy": np.__version__, "results": rows}
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"metrics_{out['date'][:10]}_{args.images}x{args.size}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"-> {path}")


if __name__ == "__main__":
  main()
