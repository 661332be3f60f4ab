"""The inference function in JAX on CPU, ONNX Runtime and OpenVINO, at equal thread counts.

  python -m benchmarks.deploy_speed [--grid small:224:8 base:392:4] [--threads 1] [--repeats 5]
      [--out benchmarks/results] [--name deploy-<date>]

Random weights (seed 0; speed does not depend on the values, and no trained ViT-B can be
downloaded here). For each (ViT, input size, batch) one process per runtime runs, one after
another, confined to --threads cores (timing.pin_process) with its runtime set to that many
threads:
  jax            evaluation's jitted map function, with the attention predict uses on this
                 backend ("auto": blocked on CPU); it then writes model.onnx through the
                 export's own path (export.inference_function + onnx_export, XLA attention,
                 a one-class calibration table) and OpenVINO's IR, untimed;
  onnxruntime    CPU provider, default graph optimisations, sequential execution;
  openvino_f32   OpenVINO CPU, INFERENCE_PRECISION_HINT f32, LATENCY hint;
  openvino_bf16  the same with bf16 (OpenVINO's default on CPUs with AMX / AVX512-BF16).
Each: one warm-up call (its time recorded as first_call_s), then --repeats timed calls on
the same random batch. The parent compares every runtime's maps and scores with JAX's (max
|difference|: the parity check of a full-size export) and writes <out>/<stem>.json and .md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import timing

GRID = ["small:224:8", "base:392:4"]
IMPLS = ("jax", "onnxruntime", "openvino_f32", "openvino_bf16")


def _jax_worker(vit, size, batch, threads, repeats, folder) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_dinomaly  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.inference import export  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.models import dinomaly  # pylint: disable=g-import-not-at-top
  bench = jax_dinomaly.JaxDinomaly(jax_dinomaly.make_config(vit, size, batch))
  images = bench.images(batch)
  np.save(os.path.join(folder, "images.npy"), np.asarray(images))
  variables = bench.variables()
  start = time.perf_counter()
  compiled, _ = bench.compile_inference(images)
  run = lambda: jax.block_until_ready(compiled(variables, images))
  outputs = run()
  first = time.perf_counter() - start
  wall, cpu = timing.timed_calls(run, repeats)
  np.savez(os.path.join(folder, "jax.npz"), maps=np.asarray(outputs[0]), scores=np.asarray(outputs[1]))
  # The exported file: the same weights, the export's function (XLA attention).
  config = bench.config.copy_and_resolve_references()
  config.model.attention_impl = "xla"
  leaves, treedef = jax.tree.flatten(jax.device_get(variables))
  model = dinomaly.build_model(config.model)  # the same parameters, XLA attention
  inference = export.inference_function(evaluate.map_function(model, config), treedef,
                                        np.array([[1.0, 0.0, 1.0]], np.float32))
  start = time.perf_counter()
  model_bytes = onnx_export.onnx_model(lambda x, ids: inference(leaves, x, ids), size)
  with open(os.path.join(folder, onnx_export.ONNX_FILE), "wb") as f:
    f.write(model_bytes)
  onnx_export.write_openvino(model_bytes, folder)
  return dict(wall=wall, cpu=cpu, first_call_s=first, export_s=time.perf_counter() - start,
              onnx_mb=round(len(model_bytes) / 2**20, 1))


def _runtime_worker(impl, threads, repeats, folder) -> dict:
  images = np.load(os.path.join(folder, "images.npy"))
  feed = {"images": images, "class_ids": np.zeros(len(images), np.int32)}
  start = time.perf_counter()
  if impl == "onnxruntime":
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    run = lambda: dict(zip(names, session.run(None, feed)))
    version = ort.__version__
  else:
    import openvino as ov  # pylint: disable=g-import-not-at-top
    precision = impl.split("_")[1]
    compiled = ov.Core().compile_model(os.path.join(folder, "model.xml"), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY"})
    run = lambda: {k.get_any_name(): v for k, v in compiled(feed).items()}
    version = ov.__version__
  outputs = run()
  first = time.perf_counter() - start
  wall, cpu = timing.timed_calls(run, repeats)
  np.savez(os.path.join(folder, f"{impl}.npz"), maps=outputs["maps"], scores=outputs["scores"])
  return dict(wall=wall, cpu=cpu, first_call_s=first, version=version)


def _row(entry, threads, impl, result, folder) -> dict:
  vit, size, batch = entry.split(":")
  row = dict(vit=vit, size=int(size), batch=int(batch), threads=threads, impl=impl,
             seconds=result.pop("wall"), cpu_seconds=result.pop("cpu"), **result)
  ours, ref = np.load(os.path.join(folder, f"{impl}.npz")), np.load(os.path.join(folder, "jax.npz"))
  row["max_abs_map_diff"] = float(np.max(np.abs(ours["maps"] - ref["maps"])))
  row["max_abs_score_diff"] = float(np.max(np.abs(ours["scores"] - ref["scores"])))
  row["map_range"] = [float(ref["maps"].min()), float(ref["maps"].max())]
  return row


def _markdown(facts, rows) -> str:
  lines = [f"# Deploy runtimes: {facts['date']}", "",
           f"{facts['cpu']}, {facts['cpu_cores']} cores; {facts['threads']} thread(s) per runtime, each in "
           f"its own pinned process; {facts['repeats']} timed calls after a warm-up; random weights. "
           f"jax {facts['jax']}, onnxruntime {facts.get('onnxruntime')}, openvino {facts.get('openvino')}. "
           f"Load average (1 min) over the run: {facts['load_range'][0]} to {facts['load_range'][1]} "
           "(other work on the machine).", "",
           "Seconds per call, median [min-max]; speed-up = JAX median / runtime median; "
           "max |map - JAX map| and |score - JAX score| on the same batch; CPU / wall = the cores a call "
           "kept busy (below 1.0: it waited for a core).", "",
           "| model | input | batch | runtime | s / call | speed-up vs JAX | images/s | max map diff | max score diff | CPU s / call | CPU / wall | first call s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    median = statistics.median(row["seconds"])
    jax_median = next(statistics.median(r["seconds"]) for r in rows if r["impl"] == "jax" and
                      (r["vit"], r["size"], r["batch"]) == (row["vit"], row["size"], row["batch"]))
    s = timing.summary(row["seconds"])
    lines.append(f"| ViT-{row['vit']} | {row['size']} | {row['batch']} | {row['impl']} | {timing.fmt_seconds(s)} | "
                 f"{jax_median / median:.2f}x | {row['batch'] / median:.2f} | {row['max_abs_map_diff']:.2g} | "
                 f"{row['max_abs_score_diff']:.2g} | {statistics.median(row['cpu_seconds']):.3g} | "
                 f"{statistics.median(row['cpu_seconds']) / median:.2f} | "
                 f"{row['first_call_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", nargs="*", default=GRID, help="vit:size:batch entries")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=timing.MIN_REPEATS)
  parser.add_argument("--impls", nargs="*", choices=IMPLS, default=list(IMPLS))
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--name", default=None, help="results file stem (default deploy-<date>)")
  parser.add_argument("--markdown", default=None, help="rewrite the .md of this results .json and stop")
  parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)  # impl entry folder
  args = parser.parse_args(argv)
  if args.repeats < timing.MIN_REPEATS:
    parser.error(f"--repeats must be >= {timing.MIN_REPEATS}.")
  if "jax" not in args.impls:
    parser.error("--impls must include jax (it writes the exported files and the reference outputs).")
  if args.markdown:
    with open(args.markdown) as f:
      results = json.load(f)
    with open(os.path.splitext(args.markdown)[0] + ".md", "w") as f:
      f.write(_markdown(results["machine"], results["results"]))
    return
  if args.worker:
    impl, entry, folder = args.worker
    timing.pin_process(args.threads)  # before any runtime starts its threads
    vit, size, batch = entry.split(":")
    result = (_jax_worker(vit, int(size), int(batch), args.threads, args.repeats, folder) if impl == "jax"
              else _runtime_worker(impl, args.threads, args.repeats, folder))
    with open(os.path.join(folder, f"{impl}.json"), "w") as f:
      json.dump(result, f)
    return

  facts = timing.machine_facts()
  facts.update(threads=args.threads, repeats=args.repeats, grid=args.grid,
               command=" ".join(["python -m benchmarks.deploy_speed", *(argv if argv is not None else sys.argv[1:])]))
  rows, loads = [], [timing.load_average()]
  start = time.perf_counter()
  for entry in args.grid:
    with tempfile.TemporaryDirectory() as folder:
      for impl in args.impls:  # jax first: it writes the files the others read
        print(f"--- {entry} {impl}, {args.threads} thread(s), load {timing.load_average()}", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.deploy_speed", "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--worker", impl, entry, folder]
        subprocess.run(cmd, env=timing.thread_env(args.threads), check=True)
        with open(os.path.join(folder, f"{impl}.json")) as f:
          result = json.load(f)
        if "version" in result:
          facts[impl.split("_")[0]] = result.pop("version")
        rows.append(_row(entry, args.threads, impl, result, folder))
        loads.append(timing.load_average())
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "cpu_seconds"}), flush=True)
  facts["load_range"] = [min(loads), max(loads)]
  facts["wall_s"] = round(time.perf_counter() - start, 1)
  name = args.name or f"deploy-{facts['date'][:10]}"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump({"machine": facts, "results": rows}, f, indent=2)
  with open(os.path.join(args.out, name + ".md"), "w") as f:
    f.write(_markdown(facts, rows))
  print(_markdown(facts, rows), f"Wrote {os.path.join(args.out, name)}.json and .md", sep="\n")


if __name__ == "__main__":
  main()
