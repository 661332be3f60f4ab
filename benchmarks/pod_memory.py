"""Peak resident memory per process of a pod run, for 1, 2 and 4 processes on this machine.

  python -m benchmarks.pod_memory [--images-per-class 200] [--crop 224] [--processes 1 2 4]

Generates a dataset (4 classes), then trains the tiny ViT-S model (random encoder) for 2
steps with the feature cache on (float32) and evaluates, once per process count, the
processes started with a local jax.distributed coordinator on the CPU. Each process reports its
peak resident set size (VmHWM). With P processes each holds 1/P of the feature cache and
evaluates only its own classes, so the per-process peak should fall as P grows.
Writes benchmarks/results/pod-memory-<date>.{json,md} (or --out).
"""
import argparse
import datetime
import json
import os
import runpy
import subprocess
import sys
import tempfile

import numpy as np
import portpicker

from benchmarks import timing
from dinomaly_jax.data import synthetic
from dinomaly_jax.training import feature_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("brick", "grass", "nut", "pill")


def child(report: str, argv: list[str]) -> None:
  """Runs the main job with `argv`, then writes this process's peak RSS to `report`."""
  sys.argv = ["dinomaly_jax.main", *argv]
  code = 0
  try:
    runpy.run_module("dinomaly_jax.main", run_name="__main__")
  except SystemExit as e:
    code = e.code or 0
  with open(report, "w") as f:
    json.dump({"peak_rss_bytes": timing.status_bytes("VmHWM"), "exit": code}, f)
  sys.exit(code)


def run_pod(root: str, workdir: str, processes: int, crop: int, out_dir: str) -> list[dict]:
  port = portpicker.pick_unused_port()
  args = [f"--config=tests/tiny_config.py:{root}", f"--workdir={workdir}",
          "--config.data.cache_features=True", "--config.data.cache_dtype=float32",
          f"--config.data.crop={crop}", f"--config.data.resize={crop * 8 // 7}",
          "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.batch_size=4", "--config.eval.batch_size=8",
          "--config.train.checkpoint_every=0", "--config.train.eval_every=0",
          "--config.eval.pictures_per_class=1"]
  procs, reports = [], []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    reports.append(os.path.join(out_dir, f"p{processes}_{i}.json"))
    procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.pod_memory", "--child", reports[-1],
                                   "--", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate()
    if p.returncode:
      raise RuntimeError(f"a process of the {processes}-process run failed:\n{err[-3000:]}")
  return [json.load(open(r)) for r in reports]


def main():
  if "--child" in sys.argv:
    i = sys.argv.index("--child")
    child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images-per-class", type=int, default=200)
  parser.add_argument("--crop", type=int, default=224)
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="pod_memory_")
  root = synthetic.generate(os.path.join(tmp, "data"), classes=CLASSES, image_size=args.crop * 8 // 7,
                            n_train=args.images_per_class, n_test_good=4, n_test_bad=4)
  n_train = len(CLASSES) * args.images_per_class
  from tests import main_helpers  # pylint: disable=g-import-not-at-top
  model_config = main_helpers.tiny_config(root).model
  from dinomaly_jax.models import dinomaly  # pylint: disable=g-import-not-at-top
  shapes = feature_cache.feature_shapes(dinomaly.build_model(model_config), (args.crop, args.crop))
  per_image = feature_cache.bytes_per_image(shapes, np.float32)
  rows = []
  for p in args.processes:
    reports = run_pod(root, os.path.join(tmp, f"run{p}"), p, args.crop, tmp)
    peaks = [r["peak_rss_bytes"] / 2**20 for r in reports]
    cache_rows = feature_cache.rows_per_process(n_train, 4 // p, p)
    rows.append({"processes": p, "peak_rss_mib_median": float(np.median(peaks)),
                 "peak_rss_mib_min": min(peaks), "peak_rss_mib_max": max(peaks),
                 "cache_rows_per_process": cache_rows,
                 "cache_mib_per_process": cache_rows * per_image / 2**20})
    print(f"{p} processes: peak RSS per process {np.median(peaks):.0f} MiB "
          f"[{min(peaks):.0f}-{max(peaks):.0f}], feature cache {rows[-1]['cache_mib_per_process']:.0f} MiB "
          "per process", flush=True)
  result = {"date": datetime.date.today().isoformat(), "crop": args.crop, "train_images": n_train,
            "classes": len(CLASSES), "cache_dtype": "float32", "model": "ViT-S/14 (random encoder)",
            "rows": rows}
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"pod-memory-{result['date']}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  lines = [f"# Peak resident memory per process ({n_train} training images of {len(CLASSES)} classes, "
           f"ViT-S/14 at {args.crop}, float32 feature cache, CPU, {result['date']})", "",
           "| processes | peak RSS per process, MiB: median [min-max] | feature cache per process, MiB |",
           "|---|---|---|"]
  lines += [f"| {r['processes']} | {r['peak_rss_mib_median']:.0f} [{r['peak_rss_mib_min']:.0f}-"
            f"{r['peak_rss_mib_max']:.0f}] | {r['cache_mib_per_process']:.0f} |" for r in rows]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"-> {stem}.md")


if __name__ == "__main__":
  main()
