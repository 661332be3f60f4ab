"""Compile time and time per train step of the jitted Dinomaly step (random weights).

  python -m benchmarks.train_step_time --vit small --sizes 224,392 --batch 8 --steps 3

For each size: state creation time, compile time of the train step (lower +
compile), then the median wall time of `--steps` steps after one warm-up step.
Results go to benchmarks/results/train_step_time.json with the date and machine.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from dinomaly_jax import sharding
from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.config.defaults import set_vit
from dinomaly_jax.config.defaults import VIT_TARGET_LAYERS
from dinomaly_jax.models.dinomaly import build_model
from dinomaly_jax.training import train_step

RESULTS = pathlib.Path(__file__).parent / "results" / "train_step_time.json"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def measure(vit: str, size: int, batch: int, steps: int, dtype: str) -> dict:
  config = base_config()
  set_vit(config, vit)
  config.model.dtype = dtype
  mesh = sharding.make_mesh()
  model = build_model(config.model)
  start = time.perf_counter()
  state = train_step.create_train_state(model, config, jax.random.PRNGKey(0), None, (size, size, 3))
  state = jax.block_until_ready(sharding.replicate(state, mesh))
  init_s = time.perf_counter() - start
  images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  batch_arrays = sharding.global_batch({"image": images}, mesh)
  step_fn = train_step.make_train_step(model, config, mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch_arrays)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return dict(vit=vit, size=size, batch=batch, dtype=dtype, devices=jax.device_count(),
              init_s=round(init_s, 2), compile_s=round(compile_s, 2),
              step_s_median=round(statistics.median(times), 3),
              step_s_all=[round(t, 3) for t in times],
              images_per_s=round(batch / statistics.median(times), 2),
              loss=float(metrics["loss"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vit", default="small", choices=sorted(VIT_TARGET_LAYERS))
  parser.add_argument("--sizes", default="224,392")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  runs = []
  for size in (int(s) for s in args.sizes.split(",")):
    runs.append(measure(args.vit, size, args.batch, args.steps, args.dtype))
    print(json.dumps(runs[-1]), flush=True)
  report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                platform=jax.devices()[0].platform, device=str(jax.devices()[0].device_kind),
                cpu=_cpu_model(), cpu_count=os.cpu_count(),
                load_average_1min=round(os.getloadavg()[0], 2), jax=jax.__version__,
                note="random weights; the CPU is shared with other processes (see load average)",
                runs=runs)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
