"""Prediction on new images: score, normalised score and decision with the class's calibrated
threshold (evaluation/calibration.py), heatmaps on the class's fixed colour scale, a CSV.

Images of any size are resized on the host and scored in batches of one compiled shape
(`image_batches.py`), at evaluation's speed, in bounded memory: decoding runs one batch
ahead of scoring and no further; at most MAX_PENDING_IMAGES scored images wait for the
writer threads (their originals are the memory), and scoring waits when they are behind.
Rows reach predictions.csv as batches finish (prediction_csv.py), so a kill loses at most the
batches in flight and a rerun skips what is done; an unreadable image becomes a row with its
error. The class of an image (which calibration judges it): predict.class_name, else its row
in predict.classes_csv, else a trained class named in its path, else the pooled calibration
(a warning says how many fell back to it).
"""
import collections
from concurrent import futures
import csv
import io
import os
import threading
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
from dinomaly_jax.inference import prediction_csv
from dinomaly_jax.training import model_state

OUTPUT_THREADS = 2  # heatmaps written while the device scores the next batch
MAX_PENDING_IMAGES = 8  # scored images waiting for the writers (each holds its original)
CLASS_FROM = {"flag": "predict.class_name", "csv": "predict.classes_csv", "path": "a folder in its path",
              "pooled": "no class known: pooled"}


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


def read_classes_csv(path: str, common: str, calibrations: dict) -> dict[str, str]:
  """{image path: class} from a CSV of path,class rows (a header row is optional; relative
  paths are relative to the input folder)."""
  if not path:
    return {}
  if not storage.isfile(path):
    raise DataError(f"config.predict.classes_csv: {path} not found; expected a CSV of path,class rows.")
  known = sorted(k for k in calibrations if k != calibration.POOLED)
  classes = {}
  for n, row in enumerate(csv.reader(io.StringIO(storage.read_text(path), newline="")), 1):
    if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "class"]):
      continue
    if len(row) < 2 or row[1].strip() not in known:
      raise DataError(f"{path}:{n}: expected path,class with a trained class ({', '.join(known)}), got {row}.")
    image = row[0].strip()
    if not (storage.is_url(image) or image.startswith("/")):
      image = storage.join(common, image)
    classes[storage.normpath(image) if not storage.is_url(image) else image] = row[1].strip()
  return classes


def class_for(path: str, class_name: str, classes_csv: dict, calibrations: dict) -> tuple[str, str]:
  """(class, how it was chosen: a CLASS_FROM key) for one image."""
  if class_name:
    return class_name, "flag"
  key = path if storage.is_url(path) else storage.normpath(path)
  if key in classes_csv:
    return classes_csv[key], "csv"
  for part in reversed(storage.parts(path)[:-1]):
    if part in calibrations and part != calibration.POOLED:
      return part, "path"
  return calibration.POOLED, "pooled"


def output_stems(paths: list[str]) -> list[str]:
  """Unique output names (no extension) mirroring the input folders: x.png and x.jpg of one
  folder become x_png and x_jpg, never one file for both."""
  common = storage.common_folder(paths)
  stems = [os.path.splitext(storage.relpath(p, common)) for p in paths]
  counts = collections.Counter(s.lower() for s, _ in stems)
  names = [s if counts[s.lower()] == 1 else f"{s}_{ext.lstrip('.')}" for s, ext in stems]
  seen = collections.Counter()
  unique = []
  for name in names:  # still equal (x_png.png beside x.png and x.jpg): numbered
    seen[name.lower()] += 1
    unique.append(name if seen[name.lower()] == 1 else f"{name}_{seen[name.lower()]}")
  return unique


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Writes predictions.csv and (predict.heatmaps) one heatmap PNG per image into predict.output;
  returns the rows of the images scored in this run (on several processes: the primary process
  returns every process's, the others their own).

  Several processes: image i is scored by process i mod P on its own devices (its share of
  eval.batch_size per batch), which writes its heatmaps and appends its rows to its own part of
  the CSV; the primary process joins the parts into predictions.csv at the end (prediction_csv.py).
  """
  p = config.predict
  paths = list_images(p.input)
  calibrations = calibration.load(workdir)
  if p.class_name and p.class_name not in calibrations:
    raise DataError(f"config.predict.class_name={p.class_name!r} is not a trained class; "
                    f"known: {sorted(k for k in calibrations if k != calibration.POOLED)}.")
  evaluate.check_inputs(config)
  classes_csv = read_classes_csv(p.classes_csv, storage.common_folder(paths), calibrations)
  out_dir = p.output or storage.join(workdir, "predictions")
  n_proc, me = jax.process_count(), jax.process_index()
  sink = prediction_csv.PredictionCsv(out_dir, resume=p.resume, process_index=me, process_count=n_proc)
  mine = [(path, stem) for i, (path, stem) in enumerate(zip(paths, output_stems(paths))) if i % n_proc == me]
  todo = [(path, stem) for path, stem in mine if path not in sink.done]
  skipped = sum(path in sink.done for path in paths)
  if skipped and storage.is_primary():
    print(f"Resuming: {skipped} of {len(paths)} images already have a row in {sink.path}; "
          "skipped (predict.resume=False starts over).", flush=True)
  if sum(sharding.gather_objects(len(todo))):  # every process restores the checkpoint together
    mesh = sharding.make_mesh()
    model, state = model_state.load_trained(config, workdir, mesh)
    here = sharding.local_mesh(mesh)
    variables = sharding.to_local(model_state.variables(state), here)
    with storage.own_share_writes():  # each process writes its own images' heatmaps
      if todo:
        predict_paths(config, evaluate.make_map_fn(model, config), variables, todo, calibrations, out_dir,
                      here, sink, classes_csv)
  path = sink.close(paths)
  if storage.is_primary():
    _summary(sink.this_run, calibrations, path)
  return sink.this_run


def _summary(rows, calibrations, path) -> None:
  """Which calibration judged how many images, and the decisions."""
  used = collections.Counter((r["class"], r["class_from"]) for r in rows if not r["error"])
  for (name, how), n in sorted(used.items()):
    cal = calibrations[name]
    print(f"{n} images judged by the {name} calibration (class from {CLASS_FROM[how]}; threshold "
          f"{cal.threshold:.4g} from {cal.source}{', ' + cal.images_from if cal.images_from else ''}; "
          f"{calibration.guarantee_text(cal)})")
  pooled = sum(n for (_, how), n in used.items() if how == "pooled")
  if pooled:
    print(f"WARNING: {pooled} images matched no trained class (no class folder in their path, no "
          "predict.class_name, not in predict.classes_csv): they were judged by the pooled calibration "
          f"{calibration.POOLED!r}, which is looser or stricter than their own class's.")
  errors = sum(bool(r["error"]) for r in rows)
  n_bad = sum(r["decision"] == "anomalous" for r in rows)
  print(f"{len(rows)} images: {n_bad} anomalous, {len(rows) - n_bad - errors} normal, {errors} unreadable "
        f"-> {path}", flush=True)


def predict_paths(config, map_fn, variables, todo, calibrations, out_dir, mesh, sink,
                  classes_csv=None) -> tuple[list[dict], float]:
  """(CSV rows, images/s): scores the (path, output stem) pairs of `todo` on `mesh` (this
  process's devices) in batches of one compiled shape (this process's share of
  eval.batch_size); writer threads draw heatmaps while the device scores the next batch, and
  each batch's rows go to `sink` once all of them are written. Prints the throughput."""
  bs, crop, p = config.eval.batch_size // jax.process_count(), config.data.crop, config.predict
  started = time.perf_counter()
  spec = jax.ShapeDtypeStruct((bs, crop, crop, 3), np.float32, sharding=sharding.data_sharding(mesh))
  scorer = map_fn.lower(variables, spec).compile()
  compiled = time.perf_counter()
  stems = dict(todo)
  room = threading.BoundedSemaphore(MAX_PENDING_IMAGES)
  in_order = collections.deque()  # the futures of each batch, oldest first
  rows = []

  def flush(wait: bool) -> None:
    while in_order and (wait or all(f.done() for f in in_order[0])):
      batch_rows = [f.result() for f in in_order.popleft()]
      sink.append(batch_rows)
      rows.extend(batch_rows)

  batches = image_batches.batches([path for path, _ in todo], config.data, bs, keep_originals=p.heatmaps)
  with futures.ThreadPoolExecutor(OUTPUT_THREADS) as pool:
    for batch in tqdm(batches, total=-(-len(todo) // bs), desc="predict", leave=False,
                      disable=not storage.is_primary()):
      images = sharding.global_batch({"image": batch.images}, mesh, "eval.batch_size")["image"]
      maps, scores = jax.device_get(scorer(variables, images))
      submitted = []
      for i, path in enumerate(batch.paths):
        name, how = class_for(path, p.class_name, classes_csv or {}, calibrations)
        room.acquire()  # back-pressure: wait for the writers
        f = pool.submit(_write_outputs, config, storage.join(out_dir, stems[path]), path, batch.originals[i],
                        batch.sizes[i], batch.errors[i], maps[i], float(scores[i]), name, how, calibrations[name])
        f.add_done_callback(lambda _: room.release())
        submitted.append(f)
      in_order.append(submitted)
      del batch, images, maps
      flush(wait=False)
    flush(wait=True)
  seconds = time.perf_counter() - compiled
  who = f"Process {jax.process_index()}: " if jax.process_count() > 1 else ""
  print(f"{who}Predicted {len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:.2f} images/s; "
        f"compiling took {compiled - started:.1f} s).", flush=True)
  return rows, len(rows) / seconds


def _write_outputs(config, stem, path, original, size, error, amap, score, class_name, how, cal) -> dict:
  """The heatmap PNG (and map .npy) of one image at its original resolution -> its CSV row."""
  row = {"image": path, "class": class_name, "class_from": how, "threshold": cal.threshold,
         "threshold_from": cal.source, "heatmap": "", "error": error}
  if error:
    return dict(row, score="", normalised_score="", decision="")
  needs_map = config.predict.heatmaps or config.predict.save_maps
  full = np.asarray(anomaly_map.full_resolution_map(amap[None], size, config.data)[0]) if needs_map else None
  if config.predict.heatmaps:
    row["heatmap"] = stem + "_heatmap.png"
    pictures.save_heatmap(row["heatmap"], original, full, cal.threshold, scale=cal.heat_range())
  if config.predict.save_maps:
    storage.write_shared_with(stem + "_map.npy", lambda f: np.save(f, full.astype(np.float32)))
  return dict(row, score=score, normalised_score=float(cal.normalise(score)),
              decision="anomalous" if score >= cal.threshold else "normal")
