"""Prediction at scale: peak resident memory and images/s as the number of images grows,
with heatmaps on and off.

  python -m benchmarks.predict_scale [--counts 1000,2500,10000] [--heatmap-counts ...] [--out benchmarks/results]

Generates JPEG images of mixed sizes (9 in 10 between 320x240 and 1024x768, 1 in 10 large,
up to 4000x3000; smooth content so the disk stays small), trains the tiny demo model (ViT-S,
random encoder, 56 px crop) for 2 steps, then runs `python -m dinomaly_jax.main --mode=predict`
as a subprocess on the first `count` images for each count, heatmaps on and off, and reads
the subprocess's peak RSS (wait4's ru_maxrss). Bounded memory means the peak stays flat as
the count grows, and within a run from its first quarter to its last (the resident memory
is read every half second). Writes predict-scale-<date>.json and .md into --out.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from benchmarks import timing
from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_S = 0.5  # how often the resident memory of the predict process is read


def generate(folder: str, n: int, seed: int = 0) -> list[str]:
  """n JPEGs, a tenth of them large (up to 4000x3000), the rest 320x240 .. 1024x768."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    if i % 10 == 9:
      w = int(rng.integers(2000, 4001))
      h = min(3000, w * 3 // 4)
    else:
      w = int(rng.integers(320, 1025))
      h = w * 3 // 4
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=85)
    paths.append(path)
  return paths


def _predict(workdir, images_glob, out, heatmaps: bool) -> dict:
  args = [sys.executable, "-m", "dinomaly_jax.main", f"--workdir={workdir}", "--mode=predict",
          f"--config.predict.input={images_glob}", f"--config.predict.output={out}",
          f"--config.predict.heatmaps={heatmaps}", "--config.predict.resume=False", "--config.predict.class_name=nut"]
  start = time.perf_counter()
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  chunks = []
  reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))
  reader.start()
  samples = []  # the resident memory (bytes) every SAMPLE_S while the process runs
  while reader.is_alive():
    samples.append(timing.status_bytes("VmRSS", proc.pid))
    reader.join(SAMPLE_S)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  output = "".join(chunks)
  if status != 0:
    raise RuntimeError(output)
  line = [l for l in output.splitlines() if l.startswith("Predicted ")][-1]
  rate = float(line.split("(")[1].split(" images/s")[0])
  samples = [x / 2**20 for x in samples if x is not None]  # MiB
  quarters = [float(np.max(q)) for q in np.array_split(np.asarray(samples), 4)] if len(samples) >= 4 else []
  return {"peak_rss_mib": usage.ru_maxrss / 1024, "peak_rss_mib_by_quarter": quarters, "images_per_s": rate,
          "wall_s": wall, "line": line}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--counts", default="1000,2500,10000", help="image counts, heatmaps off")
  parser.add_argument("--heatmap-counts", default="", help="image counts, heatmaps on (default: --counts)")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args(argv)
  counts = [int(c) for c in args.counts.split(",")]
  heatmap_counts = [int(c) for c in (args.heatmap_counts or args.counts).split(",")]
  tmp = tempfile.mkdtemp(prefix="predict_scale_")
  started = time.perf_counter()
  generate(os.path.join(tmp, "images"), max(counts + heatmap_counts))
  generated_s = time.perf_counter() - started
  root = main_helpers.tiny_dataset(os.path.join(tmp, "data"))
  workdir = os.path.join(tmp, "run")
  subprocess.run([sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{root}",
                  f"--workdir={workdir}", "--config.train.steps=2", "--config.train.warmup_steps=1",
                  "--config.train.eval_every=0", "--config.eval.pictures_per_class=0", "--config.data.workers=0"],
                 cwd=REPO, check=True, capture_output=True)
  rows = []
  runs = [(c, False) for c in counts] + [(c, True) for c in heatmap_counts]
  for count, heatmaps in runs:
    subset = os.path.join(tmp, f"subset_{count}")
    if not os.path.isdir(subset):
      os.makedirs(subset)
      for i in range(count):
        os.symlink(os.path.join(tmp, "images", f"{i:05d}.jpg"), os.path.join(subset, f"{i:05d}.jpg"))
    r = _predict(workdir, subset, os.path.join(tmp, f"out_{count}_{heatmaps}"), heatmaps)
    rows.append({"images": count, "large": count // 10, "heatmaps": heatmaps, **r})
    print(f"{count} images (heatmaps {'on' if heatmaps else 'off'}): peak RSS {r['peak_rss_mib']:.0f} MiB, "
          f"{r['images_per_s']:.2f} images/s", flush=True)
  date = datetime.date.today().isoformat()
  meta = {"counts": counts, "heatmap_counts": heatmap_counts, "generated_s": generated_s, "cpu_count": os.cpu_count(),
          "model": "tiny demo (ViT-S, random encoder, crop 56, eval.batch_size 8)", "rows": rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"predict-scale-{date}.json"), "w") as f:
    json.dump(meta, f, indent=2)
  lines = ["| images | large (<= 4000x3000) | heatmaps | peak RSS MiB | peak RSS in each quarter of the run, MiB "
           "| images/s |", "|---:|---:|---|---:|---|---:|"]
  lines += [f"| {r['images']} | {r['large']} | {'on' if r['heatmaps'] else 'off'} | {r['peak_rss_mib']:.0f} | "
            f"{', '.join(f'{q:.0f}' for q in r['peak_rss_mib_by_quarter'])} | {r['images_per_s']:.2f} |" for r in rows]
  with open(os.path.join(args.out, f"predict-scale-{date}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
