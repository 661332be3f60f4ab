"""Dinomaly-JAX vs the reference procedure in PyTorch, at equal thread counts.

  python -m benchmarks.run [--quick] [--out benchmarks/results] [--name STEM]
      [--grid small:224:8 base:392:4] [--threads 1 all] [--tasks encoder inference train train_cached]
      [--torch reference sdpa compile] [--repeats 5]

For each thread count and each implementation a fresh process runs, one after another,
confined to that many cores (XLA sizes its thread pool from them) with torch set to that
many threads; in it, for each (ViT, input size, batch) of the grid and each task, the
implementation is called once to warm up (compile), then --repeats times. One process per
implementation: sharing a process with the torch models slowed JAX's ViT-B/392 train step
from 20.3 s to 25.5 s (memory pressure on JAX's per-step allocations).
Implementations: JAX; torch "reference" (eager, the DINOv2 encoder's own attention, as
the reference code runs on CPU), "sdpa" (eager, fused attention), "compile"
(torch.compile of the sdpa model). Tasks: encoder forward, inference (maps and scores),
train step from images, and JAX's train step from cached features (its own table,
against the JAX image step). FLOPs per call come from XLA's cost analysis of the JAX
function. Each call's process CPU time is recorded beside its wall time (CPU / wall =
cores the call kept busy), and the 1-minute load average before and after every task.
Writes <out>/<stem>.json (every call's time) and <stem>.md (see benchmarks/report.py).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import report
from benchmarks import timing

FULL_GRID = ["small:224:8", "base:392:4"]
QUICK_GRID = ["small:56:1"]
TASKS = ("encoder", "inference", "train", "train_cached")
TORCH_IMPLS = ("reference", "sdpa", "compile")


def _parse_grid(entries):
  grid = []
  for entry in entries:
    vit, size, batch = entry.split(":")
    grid.append((vit, int(size), int(batch)))
  return grid


def _cost_gflop(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 1e9


def _time_task(task, name: str, fn, repeats: int, gflop: float, meta: dict) -> dict:
  """One implementation's row: a warm-up call (timed as its compile/first call), then
  `repeats` timed calls; a failing warm-up is recorded as the implementation's error."""
  row = dict(meta, task=task, gflop=gflop, first_call_s={}, errors={}, seconds={},
             cpu_seconds={})
  load_before = timing.load_average()
  start = time.perf_counter()
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except  (torch.compile may fail on a CPU)
    row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
  else:
    row["first_call_s"][name] = time.perf_counter() - start
    row["seconds"][name], row["cpu_seconds"][name] = timing.timed_calls(fn, repeats)
  row["load_before"], row["load_after"] = load_before, timing.load_average()
  print(report.row_line(row), flush=True)
  return row


def _worker(args) -> list:
  """Runs in the pinned process: every task of the grid for one implementation
  (args.impl: "jax" or a torch variant), one row each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks.jax_dinomaly import make_config  # pylint: disable=g-import-not-at-top

  threads = int(os.environ["BENCH_THREADS"])
  if args.impl != "jax":
    timing.pin_torch_threads(threads)  # once per process, before torch's first parallel work
  rows = []
  for vit, size, batch in _parse_grid(args.grid):
    meta = dict(vit=vit, size=size, batch=batch, threads=threads)
    config = make_config(vit, size, batch)
    # The same images on every side (NHWC, float32).
    host_images = np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32)
    if args.impl == "jax":
      rows += _jax_rows(args, config, host_images, meta)
    else:
      rows += _torch_rows(args, config, host_images, meta)
  return rows


def _torch_rows(args, config, host_images, meta) -> list:
  from benchmarks import torch_dinomaly  # pylint: disable=g-import-not-at-top
  cfg, impl = config.model, args.impl.removeprefix("torch_")
  twin = torch_dinomaly.TorchTwin(meta["vit"], cfg.registers, cfg.target_layers, cfg.fuse_groups,
                                  cfg.decoder_depth, cfg.bottleneck_dropout,
                                  attention="reference" if impl == "reference" else "sdpa",
                                  compile=impl == "compile")
  calls = {"encoder": lambda: twin.encoder_forward(host_images),
           "inference": lambda: twin.inference(host_images),
           "train": lambda: twin.train_step(host_images)}
  return [_time_task(task, args.impl, calls[task], args.repeats, None, meta)
          for task in args.tasks if task in calls]


def _jax_rows(args, config, host_images, meta) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.jax_dinomaly import JaxDinomaly  # pylint: disable=g-import-not-at-top
  from dinomaly_jax import sharding  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.training import feature_cache  # pylint: disable=g-import-not-at-top

  jm = JaxDinomaly(config)
  host = {"image": host_images}
  images = sharding.global_batch(host, jm.mesh, "train.batch_size")["image"]
  rows = []
  if "encoder" in args.tasks:
    fn, _ = jm.compile_encoder(images)
    p = jm.state.encoder_params
    rows.append(_time_task("encoder", "jax", lambda: jax.block_until_ready(fn(p, images)),
                           args.repeats, _cost_gflop(fn), meta))
  if "inference" in args.tasks:
    infer, _ = jm.compile_inference(images)
    variables = jm.variables()
    rows.append(_time_task("inference", "jax",
                           lambda: jax.block_until_ready(infer(variables, images)),
                           args.repeats, _cost_gflop(infer), meta))
  if "train" in args.tasks:
    step, _ = jm.compile_train_step(sharding.global_batch(host, jm.mesh, "train.batch_size"))
    holder = {"state": jm.fresh_state()}

    def jax_step():
      holder["state"], metrics = step(holder["state"], sharding.global_batch(host, jm.mesh, "train.batch_size"))
      jax.block_until_ready(metrics)

    rows.append(_time_task("train", "jax", jax_step, args.repeats, _cost_gflop(step), meta))
  if "train_cached" in args.tasks:  # bfloat16 host features, cast on the device as in training
    features = jm.cached_features(images)
    upload = feature_cache.one_process_upload(features)  # placed and cast on the device, as in training
    place = feature_cache.make_place(jm.mesh, len(upload["positions"]))
    cached, _ = jm.compile_train_step(place(sharding.global_batch(upload, jm.mesh, "train.batch_size")),
                                      from_features=True)
    cached_holder = {"state": jm.fresh_state()}

    def cached_step():
      cached_holder["state"], metrics = cached(cached_holder["state"],
                                               place(sharding.global_batch(upload, jm.mesh, "train.batch_size")))
      jax.block_until_ready(metrics)

    rows.append(_time_task("train_cached", "jax_cached", cached_step, args.repeats,
                           _cost_gflop(cached), meta))
  return rows


def _merge(rows) -> list:
  """One row per (task, model, size, batch, threads) from the per-implementation rows:
  their calls side by side, the FLOP count from the JAX row, the load range of all."""
  merged = {}
  for row in rows:
    key = tuple(row[k] for k in ("task", "vit", "size", "batch", "threads"))
    if key not in merged:
      merged[key] = dict(row, seconds={}, cpu_seconds={}, first_call_s={}, errors={})
    m = merged[key]
    for field in ("seconds", "cpu_seconds", "first_call_s", "errors"):
      m[field].update(row[field])
    if row["gflop"] is not None:
      m["gflop"] = row["gflop"]
    m["load_before"] = min(m["load_before"], row["load_before"])
    m["load_after"] = max(m["load_after"], row["load_after"])
  return list(merged.values())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="ViT-S at 56, batch 1, train tasks, torch reference only (smoke run)")
  parser.add_argument("--out", default="benchmarks/results", help="results directory")
  parser.add_argument("--name", default=None, help="results file stem (default <backend>-<date>)")
  parser.add_argument("--grid", nargs="*", help="vit:size:batch entries (default "
                      f"{' '.join(FULL_GRID)})")
  parser.add_argument("--threads", nargs="*", default=["1", "all"],
                      help="thread counts, each in its own process: 1 and/or all")
  parser.add_argument("--tasks", nargs="*", choices=TASKS, default=None,
                      help="default: all (--quick: train train_cached)")
  parser.add_argument("--torch", nargs="*", choices=TORCH_IMPLS, default=None,
                      help="torch variants (default: all; --quick: reference)")
  parser.add_argument("--repeats", type=int, default=None,
                      help=f"timed calls per figure after the warm-up (>= {timing.MIN_REPEATS})")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: output path
  parser.add_argument("--impl", default="jax", help=argparse.SUPPRESS)  # internal: worker's impl
  args = parser.parse_args(argv)
  args.grid = args.grid or (QUICK_GRID if args.quick else FULL_GRID)
  if args.torch is None:
    args.torch = ["reference"] if args.quick else list(TORCH_IMPLS)
  if args.tasks is None:
    args.tasks = ["train", "train_cached"] if args.quick else list(TASKS)
  args.repeats = args.repeats or (2 if args.quick else timing.MIN_REPEATS)
  if args.repeats < timing.MIN_REPEATS and not (args.quick or args.worker):
    parser.error(f"--repeats must be >= {timing.MIN_REPEATS} (use --quick for a smoke run).")

  if args.worker:
    timing.pin_process(int(os.environ["BENCH_THREADS"]))  # before JAX or torch start
    rows = _worker(args)
    framework = "jax" if args.impl == "jax" else "torch"
    with open(args.worker, "w") as f:
      json.dump({"rows": rows, "matmul_gflops": {framework: timing.matmul_gflops(framework)}}, f)
    return

  cores = os.cpu_count() or 1
  facts = timing.machine_facts()
  facts.update(repeats=args.repeats, grid=args.grid, torch_impls=args.torch,
               command=" ".join(["python -m benchmarks.run", *(argv if argv is not None
                                                              else sys.argv[1:])]))
  print(json.dumps(facts), flush=True)
  rows, matmul = [], {}
  start = time.perf_counter()
  impls = ["jax"] + [f"torch_{t}" for t in args.torch]
  for threads in sorted({cores if t == "all" else int(t) for t in args.threads}):
    matmul[threads] = {}
    for impl in impls:  # each implementation in its own process, one after another
      with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.run", "--worker", out, "--impl", impl,
               "--grid", *args.grid, "--tasks", *args.tasks, "--repeats", str(args.repeats)]
        print(f"--- {impl}, {threads} thread(s), load {timing.load_average()}", flush=True)
        subprocess.run(cmd, env=timing.thread_env(threads), check=True)
        with open(out) as f:
          result = json.load(f)
      rows += result["rows"]
      matmul[threads].update(result["matmul_gflops"])
    facts["wall_s"] = round(time.perf_counter() - start, 1)
    facts["matmul_gflops"] = matmul
    os.makedirs(args.out, exist_ok=True)  # written after each thread count: a stopped run keeps them
    name = args.name or f"{facts['jax_backend']}-{facts['date'][:10]}"
    merged = _merge(rows)
    for row in merged:
      if row["threads"] == threads:  # earlier thread counts were printed after their own run
        print(report.row_line(row), flush=True)
    print("Wrote", *report.write(os.path.join(args.out, name), facts, merged))


if __name__ == "__main__":
  main()
