"""Prediction on new images: score, normalised score and decision with the class's calibrated
threshold (evaluation/calibration.py), heatmaps on the class's fixed colour scale, a CSV.

Images of any size are resized on the host and scored in batches of one compiled shape
(`image_batches.py`), at evaluation's speed; the throughput is printed.
"""
from concurrent import futures
import csv
import io
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.data import image_files
from dinomaly_jax.errors import DataError
from dinomaly_jax.evaluation import anomaly_map
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.evaluation import pictures
from dinomaly_jax.inference import image_batches
from dinomaly_jax.training import model_state

OUTPUT_THREADS = 2  # heatmaps written while the device scores the next batch


def list_images(pattern: str) -> list[str]:
  """A folder (searched recursively) or a glob pattern, local or URL -> sorted image paths."""
  if not pattern:
    raise DataError("config.predict.input is empty: give a folder or a glob of images "
                    "(--config.predict.input='/data/new/*.png').")
  if storage.isdir(pattern):
    paths = storage.walk_files(pattern)
  else:
    paths = [p for p in storage.glob(pattern) if storage.isfile(p)]
  paths = sorted(p for p in paths if image_files.is_image(p))
  if not paths:
    raise DataError(f"config.predict.input: no images ({', '.join(image_files.IMAGE_EXTENSIONS)}) "
                    f"match {pattern!r}.")
  return paths


def _calibration_for(path: str, class_name: str,
                     calibrations: dict) -> tuple[str, calibration.ClassCalibration]:
  """The class's calibration: the configured class, else a known class in the path, else pooled."""
  if class_name:
    if class_name not in calibrations:
      raise DataError(f"config.predict.class_name={class_name!r} is not a trained class; "
                      f"known: {sorted(k for k in calibrations if k != calibration.POOLED)}.")
    return class_name, calibrations[class_name]
  for part in reversed(storage.parts(path)[:-1]):
    if part in calibrations and part != calibration.POOLED:
      return part, calibrations[part]
  return calibration.POOLED, calibrations[calibration.POOLED]


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Writes predictions.csv and one heatmap PNG per image into config.predict.output."""
  paths = list_images(config.predict.input)
  calibrations = calibration.load(workdir)
  out_dir = config.predict.output or storage.join(workdir, "predictions")
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh)
  rows, _ = predict_paths(config, evaluate.make_map_fn(model, config), model_state.variables(state),
                          paths, calibrations, out_dir, mesh)
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  storage.write_shared(storage.join(out_dir, "predictions.csv"), table.getvalue())
  n_bad = sum(r["decision"] == "anomalous" for r in rows)
  print(f"{len(rows)} images: {n_bad} anomalous, {len(rows) - n_bad} normal -> "
        f"{storage.join(out_dir, 'predictions.csv')}")
  return rows


def predict_paths(config, map_fn, variables, paths, calibrations, out_dir, mesh) -> tuple[list[dict], float]:
  """(CSV rows, images/s): scores `paths` in batches of one compiled shape; heatmaps are
  written by threads while the device scores the next batch. Prints the throughput."""
  bs, crop = config.eval.batch_size, config.data.crop
  started = time.perf_counter()
  spec = jax.ShapeDtypeStruct((bs, crop, crop, 3), np.float32, sharding=sharding.data_sharding(mesh))
  scorer = map_fn.lower(variables, spec).compile()
  compiled = time.perf_counter()
  common = storage.common_folder(paths)
  outputs = []
  with futures.ThreadPoolExecutor(OUTPUT_THREADS) as pool:
    for chunk, originals, images in tqdm(image_batches.batches(paths, config.data, bs),
                                         total=-(-len(paths) // bs), desc="predict", leave=False,
                                         disable=not storage.is_primary()):
      maps, scores = jax.device_get(scorer(variables, sharding.global_batch({"image": images}, mesh, "eval.batch_size")["image"]))
      for path, original, amap, score in zip(chunk, originals, maps, scores):
        class_name, cal = _calibration_for(path, config.predict.class_name, calibrations)
        rel = os.path.splitext(storage.relpath(path, common))[0]  # mirrors the input folders
        outputs.append(pool.submit(_write_outputs, config, storage.join(out_dir, rel), path, original,
                                   amap, float(score), class_name, cal))
    rows = [f.result() for f in outputs]
  seconds = time.perf_counter() - compiled
  print(f"Predicted {len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:.2f} images/s; "
        f"compiling took {compiled - started:.1f} s).", flush=True)
  return rows, len(rows) / seconds


def _write_outputs(config, stem, path, original, amap, score, class_name, cal) -> dict:
  """The heatmap PNG (and map .npy) of one image at its original resolution -> its CSV row."""
  heatmap = stem + "_heatmap.png"
  full = np.asarray(anomaly_map.full_resolution_map(amap[None], original.shape[:2], config.data)[0])
  pictures.save_heatmap(heatmap, original, full, cal.threshold, scale=cal.heat_range())
  if config.predict.save_maps:
    storage.write_shared_with(stem + "_map.npy", lambda f: np.save(f, full.astype(np.float32)))
  return {"image": path, "class": class_name, "score": score,
          "normalised_score": float(cal.normalise(score)), "threshold": cal.threshold,
          "threshold_from": cal.source, "decision": "anomalous" if score >= cal.threshold else "normal",
          "heatmap": heatmap}
