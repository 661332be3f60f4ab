"""Dinomaly-JAX vs the same work in PyTorch, side by side in one process.

  python -m benchmarks.run [--quick] [--out benchmarks/results]

For each ViT size, input size and batch: the encoder's softmax attention, encoder
forward, full inference (encoder, bottleneck, decoder, anomaly maps, image scores), the
train step (from images and from cached features) and the train step with data loading
(PNG pipeline vs feature cache); JAX and PyTorch calls alternate so that load from
other processes hits both alike; each figure is the fastest of --repeats calls after one warm-up call (other
processes only ever add time; every call's time is kept in the JSON). Writes
<out>/<platform>-<date>.json and .md.
"""
import argparse
import gc
import json
import os
import time

import jax
import numpy as np

from benchmarks import report
from benchmarks import timing
from benchmarks.jax_dinomaly import JaxDinomaly
from benchmarks.jax_dinomaly import make_config
from benchmarks.report import Row
from dinomaly_jax import sharding
from dinomaly_jax.models import attention
from dinomaly_jax.training import feature_cache

# (vit, image size, encoder/inference batches, train batch). Train batches are small
# because a CPU step at 392 takes seconds to tens of seconds; the GPU check uses the
# protocol's 16. The last encoder batch equals the train batch, so the report can show
# the encoder's share of the image train step.
FULL_GRID = [
    ("small", 224, (1, 8), 8),
    ("small", 392, (1, 4), 4),
    ("base", 224, (1, 8), 8),
    ("base", 392, (1, 4), 4),
]
QUICK_GRID = [("small", 224, (1,), 2)]
TASKS = ("attention", "encoder", "inference", "train", "train_cached", "train_e2e")


def _mib(x):
  return None if x is None else round(x / 2**20, 1)


def measure(jax_fn, torch_fn, repeats: int, rss: timing.PeakRss, torch_threads=()):
  """Warm-up calls (sampling memory), then interleaved timing -> (times per fn, JAX RSS
  growth, torch RSS growth). torch_fn (may be None) runs once per thread count in
  `torch_threads`: OpenMP on every core is fastest on an idle machine but many times
  slower when other processes share the cores, so each torch figure is its best."""
  fns = {"jax": jax_fn}
  _, jax_peak = rss.measure(jax_fn)
  torch_peak = None
  for threads in torch_threads if torch_fn is not None else ():
    def with_threads(threads=threads):
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads)
      return torch_fn()
    fns[f"torch_{threads}t"] = with_threads
    _, peak = rss.measure(with_threads)
    torch_peak = peak if torch_peak is None else max(torch_peak, peak)
  return timing.interleaved_times(fns, repeats), jax_peak, torch_peak


def _compiled_attention(impl, q, k, v):
  start = time.perf_counter()
  fn = jax.jit(lambda *a: attention.dot_product_attention(*a, impl=impl)).lower(q, k, v).compile()
  return fn, time.perf_counter() - start


def bench_size(vit, size, batches, train_batch, tasks, repeats, rss, torch_threads):
  rows = []
  jm = JaxDinomaly(make_config(vit, size, train_batch))
  tm = None
  if torch_threads:
    from benchmarks import torch_dinomaly  # pylint: disable=g-import-not-at-top
    cfg = jm.config.model
    tm = torch_dinomaly.TorchTwin(vit, cfg.registers, cfg.target_layers, cfg.fuse_groups,
                                  cfg.decoder_depth, cfg.bottleneck_dropout)

  def add(task, batch, jax_fn, torch_fn, compile_s, baseline="torch"):
    gc.collect()
    times, jax_peak, torch_peak = measure(jax_fn, torch_fn, repeats, rss, torch_threads)
    torch_times = [t for name, ts in times.items() if name.startswith("torch") for t in ts]
    row = Row(task, vit, size, batch, min(times["jax"]), min(torch_times, default=None), compile_s,
              _mib(jax_peak), _mib(torch_peak), _mib(timing.device_peak_bytes()), baseline,
              times)
    rows.append(row)
    print(report.row_line(row), flush=True)

  for batch in batches:
    if "attention" in tasks:  # the encoder's softmax attention alone, per implementation
      enc = jm.model.encoder
      shape = (batch, 1 + enc.num_registers + (size // enc.patch_size)**2, enc.num_heads,
               enc.embed_dim // enc.num_heads)
      q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
      tq, tk, tv = (tm and tm.to_heads_first(np.array(x)) for x in (q, k, v))
      for impl in ("auto", "xla"):
        fn, compile_s = _compiled_attention(impl, q, k, v)
        add(f"attention_{impl}", batch, lambda fn=fn: jax.block_until_ready(fn(q, k, v)),
            tm and (lambda: tm.attention(tq, tk, tv)), compile_s)
    images = jm.images(batch)
    host_images = np.array(images)
    if "encoder" in tasks:
      fn, compile_s = jm.compile_encoder(images)
      p = jm.state.encoder_params
      add("encoder", batch, lambda: jax.block_until_ready(fn(p, images)),
          tm and (lambda: tm.encoder_forward(host_images)), compile_s)
    if "inference" in tasks:
      fn, compile_s = jm.compile_inference(images)
      ep, p = jm.state.encoder_params, jm.state.params
      add("inference", batch, lambda: jax.block_until_ready(fn(ep, p, images)),
          tm and (lambda: tm.inference(host_images)), compile_s)

  train_tasks = [t for t in ("train", "train_cached") if t in tasks]
  if train_tasks:
    host = {"image": np.array(jm.images(train_batch))}
    step_seconds = {}
    torch_step = tm and (lambda: tm.train_step(host["image"]))
    for task in train_tasks:
      if task == "train":
        batch_fn = lambda: sharding.global_batch(host, jm.mesh)
      else:
        features = jm.cached_features(sharding.global_batch(host, jm.mesh)["image"])
        batch_fn = lambda: sharding.global_batch(features, jm.mesh)
      if task == "train_cached":  # bfloat16 host features, cast on the device as in training
        cast = feature_cache.to_float32
        step, compile_s = jm.compile_train_step(cast(batch_fn()), from_features=True)
        run_step = lambda s, b, step=step: step(s, cast(b))
      else:
        run_step, compile_s = jm.compile_train_step(batch_fn())
      holder = {"state": jm.fresh_state()}

      def jax_step(run_step=run_step, batch_fn=batch_fn, holder=holder):
        holder["state"], metrics = run_step(holder["state"], batch_fn())
        jax.block_until_ready(metrics)

      # The torch twin has no cached path: train_cached is compared with its image step.
      add(task, train_batch, jax_step, torch_step if task == "train" else None, compile_s)
      if task == "train_cached" and "train" in step_seconds:
        rows[-1].torch_s, rows[-1].torch_rss_growth_mib = (rows[-2].torch_s,
                                                          rows[-2].torch_rss_growth_mib)
      step_seconds[task] = rows[-1].jax_s
    if len(step_seconds) == 2:
      rows.append(Row("cached_vs_uncached", vit, size, train_batch, step_seconds["train_cached"],
                      step_seconds["train"], 0.0, None, None, None, baseline="jax uncached"))
      print(report.row_line(rows[-1]), flush=True)
  if "train_e2e" in tasks:
    from benchmarks import e2e_training  # pylint: disable=g-import-not-at-top
    result = e2e_training.bench(jm, steps=repeats)
    rows.append(Row("e2e_cached_vs_images", vit, size, train_batch, result["cached_s"],
                    result["images_s"], result["cache_build_s"], None, None, None,
                    baseline="jax image pipeline"))
    print(report.row_line(rows[-1]), f"(cache of {result['cache_images']} images built in "
          f"{result['cache_build_s']:.1f}s, compile included)", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smallest size only (CI smoke run)")
  parser.add_argument("--out", default="benchmarks/results", help="results directory")
  parser.add_argument("--vit", nargs="*", choices=("small", "base", "large"),
                      help="only these ViT sizes")
  parser.add_argument("--size", nargs="*", type=int, help="only these input sizes")
  parser.add_argument("--tasks", nargs="*", choices=TASKS,
                      help="default: all (--quick: all but train_e2e)")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure")
  parser.add_argument("--no-torch", action="store_true", help="JAX figures only")
  parser.add_argument("--torch-threads", default="auto",
                      help="torch intra-op threads; auto = time both 1 and all cores, keep the faster")
  parser.add_argument("--name", default=None, help="results file stem (default <platform>-<date>)")
  args = parser.parse_args(argv)

  grid = QUICK_GRID if args.quick else FULL_GRID
  grid = [g for g in grid if (not args.vit or g[0] in args.vit) and (not args.size or g[1] in args.size)]
  if not grid:
    parser.error("--vit/--size select nothing from the grid "
                 f"{[(g[0], g[1]) for g in (QUICK_GRID if args.quick else FULL_GRID)]}.")
  repeats = args.repeats or (1 if args.quick else 4)
  tasks = args.tasks or ([t for t in TASKS if t != "train_e2e"] if args.quick else TASKS)
  facts = timing.machine_facts()
  torch_threads = []
  if not args.no_torch:
    torch_threads = (sorted({1, os.cpu_count() or 1}) if args.torch_threads == "auto"
                     else [int(args.torch_threads)])
    facts["torch_threads"] = torch_threads
  print(json.dumps(facts), flush=True)
  rss = timing.PeakRss()
  start = time.perf_counter()
  rows = []
  try:
    for vit, size, batches, train_batch in grid:
      rows += bench_size(vit, size, batches, train_batch, tasks, repeats, rss, torch_threads)
  finally:
    rss.close()
  facts["wall_s"] = round(time.perf_counter() - start, 1)
  facts["repeats"] = repeats
  facts["matmul_gflops"] = timing.matmul_gflops(with_torch=not args.no_torch)
  os.makedirs(args.out, exist_ok=True)
  name = args.name or f"{jax.default_backend()}-{facts['date'][:10]}"
  paths = report.write(os.path.join(args.out, name), facts, rows)
  print("Wrote", *paths)


if __name__ == "__main__":
  main()
