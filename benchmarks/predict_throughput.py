"""Prediction vs evaluation throughput (images/s) on the same images, after compilation.

  python -m benchmarks.predict_throughput [--image-size 256] [--crop 112] [--images 48]

Generates a synthetic dataset (image_size px PNGs), trains the demo model (ViT-S, random
encoder) for 3 steps, then times the evaluation map loop (`evaluate.score_records`: grain
pipeline, maps and scores) and prediction (`predict.predict_paths`: host resize, batches of
one compiled shape, a heatmap PNG and a CSV row per image) over the same test images.
Target: prediction within 1.5x of evaluation (ratio = eval images/s / predict images/s).
"""
import argparse
import os
import tempfile
import time

import jax

from dinomaly_jax import run
from dinomaly_jax import sharding
from dinomaly_jax.config import saved
from dinomaly_jax.data import index
from dinomaly_jax.data import synthetic
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.inference import predict
from dinomaly_jax.inference import prediction_csv
from dinomaly_jax.training import model_state
from tests import main_helpers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--crop", type=int, default=112)
  parser.add_argument("--images", type=int, default=48, help="test images (half defective)")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="predict_throughput_")
  root = synthetic.generate(os.path.join(tmp, "data"), classes=("brick",), image_size=args.image_size,
                            n_train=8, n_test_good=args.images // 2, n_test_bad=args.images - args.images // 2)
  config = main_helpers.tiny_config(root, steps=3, eval_every=0, checkpoint_every=0)
  config.data.crop, config.data.resize = args.crop, args.crop * 8 // 7
  config.eval.batch_size, config.eval.pictures_per_class = 16, 0
  workdir = os.path.join(tmp, "run")
  run.run(config, workdir)
  config = saved.load(workdir)
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh)
  variables = model_state.variables(state)
  map_fn = evaluate.make_map_fn(model, config)
  records = index.build_records(config.data, "test")
  evaluate.score_records(config, map_fn, variables, records, mesh)  # compiles
  start = time.perf_counter()
  evaluate.score_records(config, map_fn, variables, records, mesh)
  eval_rate = len(records) / (time.perf_counter() - start)
  calibrations = calibration.load(workdir)  # the class calibrations the run wrote
  paths = [r.image_path for r in records]
  out = os.path.join(tmp, "predictions")
  _, predict_rate = predict.predict_paths(config, map_fn, variables, list(zip(paths, predict.output_stems(paths))),
                                          calibrations, out, mesh, prediction_csv.PredictionCsv(out, resume=False))
  print(f"{len(paths)} images of {args.image_size}x{args.image_size} px, ViT-S at {args.crop}, "
        f"batch {config.eval.batch_size}, {jax.device_count()} {jax.devices()[0].platform} device(s): "
        f"eval {eval_rate:.2f} images/s, predict {predict_rate:.2f} images/s (with heatmaps), "
        f"ratio {eval_rate / predict_rate:.2f} (target <= 1.5)")


if __name__ == "__main__":
  main()
