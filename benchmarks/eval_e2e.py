"""The whole evaluation, dataset folder to the seven metrics, this project vs the reference's
procedure, with the same weights; and the per-image cost of predict.

  python -m benchmarks.eval_e2e [--out benchmarks/results] [--good 50 --bad 75] [--repeats 5] [--quick]

Generates an MVTec-layout dataset (dinomaly_jax.data.synthetic; 4 classes, by default
4 x (50 good + 75 defective) = 500 test images of 256 px with their masks), builds a
random-weight Dinomaly ViT-S in PyTorch (benchmarks/torch_dinomaly.py), saves it as a
reference (ViTill) checkpoint and converts it with weight_conversion, so that both sides
hold the same weights. Then, each as a fresh process timed from start to its report,
the two evaluations alternating `--repeats` times (median [min-max] of the runs):
  jax:       python -m dinomaly_jax.main --mode=eval (the project's evaluation);
  reference: python -m benchmarks.reference_eval (the reference's evaluation_batch
             procedure: torch maps, scikit-learn metrics, per-threshold skimage AUPRO);
  predict:   python -m dinomaly_jax.main --mode=predict over all test images, and over
             one image (start-up and compile), giving the per-image cost.
Both evaluations run on all cores; the load average is recorded before and after each.
Writes <out>/eval-<date>.json and .md (times, both sides' metrics and their difference).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import timing

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
CROP, RESIZE = 224, 256


def _timed(cmd, **kwargs) -> dict:
  before = timing.load_average()
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return {"seconds": seconds, "load_before": before, "load_after": timing.load_average(),
          "stdout": proc.stdout}


def _jax_config_args(root, weights, workdir):
  return ["--config=configs/mvtec.py:vit=small", f"--workdir={workdir}",
          f"--config.data.root={root}", f"--config.encoder_weights={weights}",
          f"--config.data.crop={CROP}", f"--config.data.resize={RESIZE}",
          "--config.eval.pictures_per_class=0"]


def _jax_report(workdir) -> dict:
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    return json.load(f)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--good", type=int, default=50, help="good test images per class")
  parser.add_argument("--bad", type=int, default=75, help="defective test images per class")
  parser.add_argument("--repeats", type=int, default=timing.MIN_REPEATS,
                      help="runs of each evaluation, alternating (--quick: 1)")
  parser.add_argument("--quick", action="store_true", help="2 + 2 images per class (smoke run)")
  args = parser.parse_args(argv)
  if args.quick:
    args.good, args.bad, args.repeats = 2, 2, 1
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_dinomaly  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.config.defaults import base_config  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.config.defaults import set_vit  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  facts = timing.machine_facts()
  result = {"facts": facts, "crop": CROP, "resize": RESIZE, "vit": "small"}
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    root = synthetic.generate(os.path.join(tmp, "data"), image_size=RESIZE, n_train=1,
                              n_test_good=args.good, n_test_bad=args.bad)
    result["generate_s"] = time.perf_counter() - start
    config = base_config()
    set_vit(config, "small")
    m = config.model
    torch.manual_seed(0)
    model = torch_dinomaly.TorchDinomaly("small", m.registers, m.target_layers, m.fuse_groups,
                                         m.decoder_depth, m.bottleneck_dropout)
    checkpoint = os.path.join(tmp, "dinomaly_twin.pth")
    torch.save(torch_dinomaly.vitill_state_dict(model), checkpoint)
    weights = os.path.join(tmp, "weights")
    _timed([sys.executable, "-m", "weight_conversion.convert", "--checkpoint", checkpoint,
            "--out", weights])
    images = sorted(glob.glob(os.path.join(root, "*", "test", "*", "*.png")))
    result["test_images"] = len(images)
    print(f"{len(images)} test images; load {timing.load_average()}", flush=True)

    jax_runs, ref_runs = [], []
    for run in range(args.repeats):
      workdir = os.path.join(tmp, f"run{run}")
      os.makedirs(workdir)  # eval writes its thresholds there; a fresh one per run
      jax_runs.append(_timed([sys.executable, "-m", "dinomaly_jax.main", "--mode=eval",
                              *_jax_config_args(root, weights, workdir)]))
      ref_runs.append(_timed([sys.executable, "-m", "benchmarks.reference_eval", "--root", root,
                              "--checkpoint", checkpoint, "--vit", "small", "--resize",
                              str(RESIZE), "--crop", str(CROP)]))
      print(f"run {run + 1}/{args.repeats}: jax eval {jax_runs[-1]['seconds']:.1f}s, reference eval "
            f"{ref_runs[-1]['seconds']:.1f}s", flush=True)
    workdir = os.path.join(tmp, "run0")
    reference = json.loads(ref_runs[0]["stdout"].strip().splitlines()[-1])
    result["jax_eval"] = _runs(jax_runs, report=_jax_report(workdir),
                               stdout=jax_runs[-1]["stdout"][-3000:])
    result["reference_eval"] = _runs(ref_runs, metrics=reference["metrics"])

    predict = {}
    for name, pattern in (("one", images[0]), ("all", os.path.join(root, "*", "test", "*", "*.png"))):
      predict[name] = _timed([sys.executable, "-m", "dinomaly_jax.main", "--mode=predict",
                              *_jax_config_args(root, weights, workdir),
                              f"--config.predict.input={pattern}",
                              f"--config.predict.output={os.path.join(tmp, 'pred_' + name)}"])
      predict[name].pop("stdout")
    per_image = (predict["all"]["seconds"] - predict["one"]["seconds"]) / (len(images) - 1)
    result["predict"] = dict(predict, per_image_s=per_image)
    print(f"predict {per_image * 1e3:.0f} ms/image", flush=True)

  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"eval-{facts['date'][:10]}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(result))
  print("Wrote", stem + ".json", stem + ".md")


def _runs(runs, **extra) -> dict:
  """Timed runs -> their seconds' summary, each run's seconds and load before/after."""
  seconds = [run["seconds"] for run in runs]
  return dict(extra, summary=timing.summary(seconds), seconds=seconds,
              load=[[run["load_before"], run["load_after"]] for run in runs])


def _load_range(runs) -> str:
  loads = [x for pair in runs["load"] for x in pair]
  return f"{min(loads)}-{max(loads)}"


def _metric_gap(r) -> float:
  """Max |project - reference| over the seven mean metrics, in percentage points."""
  ours = r["jax_eval"]["report"]["mean"]
  return max(abs(100 * ours[k] - r["reference_eval"]["metrics"]["mean"][k]) for k in METRICS)


def markdown(r) -> str:
  j, ref, p = r["jax_eval"], r["reference_eval"], r["predict"]
  lines = [f"# Evaluation end to end, {r['facts']['date']}", "",
           f"- {r['test_images']} generated test images ({r['resize']} px, masks alike), ViT-S/14 "
           f"with 4 registers at {r['crop']}, random weights shared by both sides (a reference "
           "checkpoint converted with weight_conversion); all cores "
           f"({r['facts']['cpu_cores']}, {r['facts']['cpu']}).",
           "- Each run is one fresh process timed from start to its metrics (start-up, model "
           "load, JIT compile, image decoding, maps, all seven metrics incl. AUPRO); the two "
           f"sides alternate, {len(j['seconds'])} runs each: median [min-max] seconds.", "",
           "| procedure | wall s | load before/after, range over the runs |", "|---|---|---|",
           f"| this project (`--mode=eval`) | {timing.fmt_seconds(j['summary'])} | "
           f"{_load_range(j)} |",
           "| reference procedure in torch (benchmarks/reference_eval.py) | "
           f"{timing.fmt_seconds(ref['summary'])} | {_load_range(ref)} |",
           "| ratio (reference / project) | "
           f"{timing.fmt_ratio(timing.ratio(ref['summary'], j['summary']))} | |", "",
           f"Predict (`--mode=predict`, heatmap PNG per image): {p['per_image_s'] * 1e3:.0f} ms per "
           f"image ({p['all']['seconds']:.1f} s for all, {p['one']['seconds']:.1f} s for one "
           "image, i.e. start-up and compile).", "",
           "Reference-procedure metrics (mean over classes, %): " +
           ", ".join(f"{k} {ref['metrics']['mean'][k]:.2f}" for k in METRICS) +
           f"; largest difference from this project's report: {_metric_gap(r):.2g} points "
           "(same weights, so the two procedures must agree).", ""]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
