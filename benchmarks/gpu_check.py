"""The key accelerator measurements in one script (under 8 minutes on one GPU).

  python -m benchmarks.gpu_check [--out benchmarks/results]     # on a GPU machine
  python -m benchmarks.gpu_check --smoke [--out DIR]             # tiny, on CPU, to test it

ViT-B/14 at 392 in bfloat16 (float32 parameters and optimizer state): inference images/s,
train step time (protocol batch 16; images already on the device, and fed from host
memory each step), the projected time of the protocol's 10,000 steps, the cached-feature
train step, and the agreement of cuDNN and XLA attention. Results are written after
every phase to <out>/<platform>-check-<date>.json, so a run stopped early keeps them.
A --smoke run writes into a new temporary folder unless --out is given (never into
benchmarks/results, which holds real measurements).
"""
import argparse
import datetime
import json
import os
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.jax_dinomaly import JaxDinomaly
from benchmarks.jax_dinomaly import make_config
from dinomaly_jax import sharding
from dinomaly_jax.models import attention
from dinomaly_jax.training import feature_cache

PUBLISHED_IMAGES_PER_S = 58.1  # reference ViT-B/14 at 392, PROTOCOL.md (one RTX 3090)
PROTOCOL_STEPS = 10_000

FULL = dict(vit="base", size=392, dtype="bfloat16", infer_batches=(64, 256), train_batch=16,
            infer_calls=20, train_steps=50)
SMOKE = dict(vit="small", size=56, dtype="bfloat16", infer_batches=(2,), train_batch=2,
             infer_calls=2, train_steps=2)


def _timed_loop(fn, calls: int) -> float:
  """Seconds per call of `calls` calls dispatched back to back, one sync at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def inference(jm: JaxDinomaly, batch: int, calls: int) -> dict:
  images = jm.images(batch)
  fn, compile_s = jm.compile_inference(images)
  variables = jm.variables()
  jax.block_until_ready(fn(variables, images))
  seconds = _timed_loop(lambda: fn(variables, images), calls)
  return {"batch": batch, "compile_s": compile_s, "seconds_per_batch": seconds,
          "images_per_s": batch / seconds,
          "vs_published_58.1": batch / seconds / PUBLISHED_IMAGES_PER_S}


def train(jm: JaxDinomaly, steps: int) -> dict:
  batch = jm.config.train.batch_size
  host = {"image": np.array(jm.images(batch))}
  device_batch = sharding.global_batch(host, jm.mesh, "train.batch_size")
  step, compile_s = jm.compile_train_step(device_batch)
  holder = {"state": jm.fresh_state()}

  def one(batch_fn):
    holder["state"], metrics = step(holder["state"], batch_fn())
    return metrics

  jax.block_until_ready(one(lambda: device_batch))
  on_device = _timed_loop(lambda: one(lambda: device_batch), steps)
  from_host = _timed_loop(lambda: one(lambda: sharding.global_batch(host, jm.mesh, "train.batch_size")), steps)
  loss = float(jax.device_get(one(lambda: device_batch))["loss"])
  return {"batch": batch, "compile_s": compile_s, "step_s_device_batch": on_device,
          "step_s_host_batch": from_host, "images_per_s": batch / from_host,
          "projected_10k_steps_min": (PROTOCOL_STEPS * from_host + compile_s) / 60,
          "finite_loss": bool(np.isfinite(loss))}


def train_cached(jm: JaxDinomaly, steps: int) -> dict:
  host = {"image": np.array(jm.images(jm.config.train.batch_size))}
  features = jm.cached_features(sharding.global_batch(host, jm.mesh, "train.batch_size")["image"])
  upload = feature_cache.one_process_upload(features)  # placed and cast on the device, as in training
  place = feature_cache.make_place(jm.mesh, len(upload["positions"]))
  step, compile_s = jm.compile_train_step(place(sharding.global_batch(upload, jm.mesh, "train.batch_size")),
                                          from_features=True)
  holder = {"state": jm.fresh_state()}

  def one():
    holder["state"], metrics = step(holder["state"], place(sharding.global_batch(upload, jm.mesh, "train.batch_size")))
    return metrics

  jax.block_until_ready(one())
  seconds = _timed_loop(one, steps)
  return {"compile_s": compile_s, "step_s_host_features": seconds,
          "projected_10k_steps_min": (PROTOCOL_STEPS * seconds + compile_s) / 60}


def attention_agreement(cfg: dict, fast_impl: str) -> dict:
  """Max |fast - xla| of ViT-B-shaped attention on random inputs, in bfloat16."""
  heads, head_dim = (12, 64) if cfg["vit"] == "base" else (6, 64)
  tokens = 1 + 4 + (cfg["size"] // 14) ** 2
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (8, tokens, heads, head_dim), jnp.bfloat16) for key in keys)
  run = lambda impl: jax.jit(lambda *a: attention.dot_product_attention(*a, impl=impl))(q, k, v)
  xla = np.float32(run("xla"))
  fast = np.float32(run(fast_impl))
  reference = np.float32(jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v))))
  return {"impl": fast_impl, "auto_picks": attention._auto_impl(q),  # pylint: disable=protected-access
          "max_abs_diff_vs_xla": float(np.abs(fast - xla).max()),
          "max_abs_err_vs_float32": {fast_impl: float(np.abs(fast - reference).max()),
                                     "xla": float(np.abs(xla - reference).max())}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, any backend (CPU test)")
  parser.add_argument("--out", default=None,
                      help="results folder (default: benchmarks/results; with --smoke a new temporary folder)")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = tempfile.mkdtemp(prefix="gpu_check_smoke_") if args.smoke else "benchmarks/results"
  cfg = SMOKE if args.smoke else FULL
  if not args.smoke and jax.default_backend() != "gpu":
    parser.error(f"no GPU (JAX backend {jax.default_backend()!r}); use --smoke to test on CPU.")
  fast_impl = "cudnn" if jax.default_backend() == "gpu" else "blocked"

  facts = timing.machine_facts()
  results = {"facts": facts, "config": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in cfg.items()},
             "published_images_per_s": PUBLISHED_IMAGES_PER_S}
  os.makedirs(args.out, exist_ok=True)
  name = f"{jax.default_backend()}-check{'-smoke' if args.smoke else ''}-{facts['date'][:10]}"
  path = os.path.join(args.out, name + ".json")
  start = time.perf_counter()
  jm = JaxDinomaly(make_config(cfg["vit"], cfg["size"], cfg["train_batch"], cfg["dtype"]))

  phases = [("attention", lambda: attention_agreement(cfg, fast_impl))]
  phases += [(f"inference_b{b}", lambda b=b: inference(jm, b, cfg["infer_calls"]))
             for b in cfg["infer_batches"]]
  phases += [("train", lambda: train(jm, cfg["train_steps"])),
             ("train_cached", lambda: train_cached(jm, cfg["train_steps"]))]
  for phase, fn in phases:
    try:
      results[phase] = fn()
    except Exception as e:  # pylint: disable=broad-except
      results[phase] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results["device_peak_mib"] = (None if timing.device_peak_bytes() is None
                                  else timing.device_peak_bytes() / 2**20)
    results["elapsed_s"] = time.perf_counter() - start
    results["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
    print(phase, json.dumps({k: v for k, v in results[phase].items() if k != "traceback"}),
          flush=True)
  print("Wrote", path)
  failed = [p for p, _ in phases if "error" in results[p]]
  if failed:
    raise SystemExit(f"Phases failed: {failed}; see {path}.")


if __name__ == "__main__":
  main()
