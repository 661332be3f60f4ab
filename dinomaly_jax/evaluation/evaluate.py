"""The eval loop: anomaly maps for every test (and calibration) image, metrics per class,
calibrated thresholds, reports (md, json, csv, html), pictures."""
import contextlib
import json
import os
import sys
import warnings

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from tqdm import tqdm

from dinomaly_jax import compiler_options
from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.data import calibration as data_calibration
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import anomaly_map
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import html_report
from dinomaly_jax.evaluation import inspection as inspection_lib
from dinomaly_jax.evaluation import metrics
from dinomaly_jax.evaluation import pictures
from dinomaly_jax.evaluation import report

THRESHOLDS_FILE = "thresholds.json"
POOLED = calibration.POOLED  # the threshold over all classes' test images, for images of unknown class


def make_map_fn(model, config: ml_collections.ConfigDict):
  """jit: (variables, images (B, H, W, 3)) -> (maps (B, S, S), scores (B,))."""
  return jax.jit(map_function(model, config), compiler_options=compiler_options.heavy_jit_options())


def map_function(model, config: ml_collections.ConfigDict):
  """(variables, images (B, H, W, 3)) -> (maps (B, S, S), scores (B,)), not jitted (to nest)."""
  e = config.eval

  def map_fn(variables, images):
    enc_groups, dec_groups = model.apply(variables, images, train=False)
    maps = anomaly_map.anomaly_map(
        enc_groups, dec_groups, images.shape[1:3], map_size=e.map_size,
        gaussian_size=e.gaussian_size, gaussian_sigma=e.gaussian_sigma)
    return maps, anomaly_map.image_score(maps, e.top_ratio)

  return map_fn


def predict_records(config, map_fn, variables, records, mesh, desc="eval"):
  """Maps, scores and masks (host numpy, in record order) for `records`, on all processes."""
  n = len(records)
  size = config.eval.map_size
  maps = np.zeros((n, size, size), np.float32)
  masks = np.zeros((n, config.data.mask_size, config.data.mask_size), np.uint8)
  scores = np.zeros((n,), np.float32)
  seen = np.zeros((n,), np.int32)
  n_proc = jax.process_count()
  batch = -(-config.eval.batch_size // n_proc)  # per process
  batches = pipeline.eval_iterator(records, config.data, batch_size=batch,
                                   process_index=jax.process_index(), process_count=n_proc)
  total = pipeline.num_eval_batches(n, batch, n_proc)
  for local in tqdm(batches, total=total, desc=desc, disable=jax.process_index() != 0,
                    dynamic_ncols=True, leave=False):
    g = sharding.global_batch({"image": local["image"]}, mesh)
    b_maps, b_scores = map_fn(variables, g["image"])
    b_maps, b_scores, idx, valid, b_masks = multihost_utils.process_allgather(
        (b_maps, b_scores, local["index"], local["valid"], local["mask"]), tiled=True)
    idx, valid = idx[valid], valid.nonzero()[0]
    maps[idx], scores[idx], masks[idx] = b_maps[valid], b_scores[valid], b_masks[valid]
    np.add.at(seen, idx, 1)
  if not np.all(seen == 1):
    raise RuntimeError(f"Evaluation scored {int((seen == 0).sum())} images never and "
                       f"{int((seen > 1).sum())} more than once; the eval pipeline is broken.")
  return maps, scores, masks


@contextlib.contextmanager
def _warnings_as_lines(class_name: str):
  """The metrics' warnings (a class without defect masks: NaN pixel metrics) as one line each
  on stderr, naming the class, instead of Python's warning with its source line."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    yield
  for message in dict.fromkeys(str(w.message) for w in caught):
    print(f"warning: {class_name}: {message}", file=sys.stderr, flush=True)


def _by_class(records) -> dict[str, list]:
  by_class = {}
  for r in records:
    by_class.setdefault(r.class_name, []).append(r)
  return by_class


def evaluate(config, workdir, model, variables, records, *, step, mesh) -> dict:
  """Scores every test record, writes the reports, thresholds, calibration and pictures (process 0).

  `variables`: the Dinomaly module's variables ({"params": {encoder, bottleneck, decoder}}).
  The calibration images (config.data.calibration) are scored too: they set the decision
  thresholds and the normalisation (calibration.py); without them the test labels do.
  """
  map_fn = make_map_fn(model, config)
  e = config.eval
  calibration_records = _by_class(data_index.build_records(config.data, "calibration"))
  per_class, thresholds, calibrations, inspection, views = {}, {}, {}, {}, []
  pooled = {"scores": [], "labels": [], "calibration": [], "maps": [], "test_maps": []}
  out_dir = storage.join(workdir, "eval")
  for name, class_records in sorted(_by_class(records).items()):
    maps, scores, masks = predict_records(config, map_fn, variables, class_records, mesh, desc=f"eval {name}")
    if name in calibration_records:
      cal_maps, cal_scores, _ = predict_records(config, map_fn, variables, calibration_records[name],
                                                mesh, desc=f"calibrate {name}")
    if jax.process_index() != 0:
      continue
    labels = np.array([r.label for r in class_records], np.int32)
    pixel_args = dict(aupro=e.aupro, aupro_max_fpr=e.aupro_max_fpr, aupro_thresholds=e.aupro_thresholds)
    with _warnings_as_lines(name):
      per_class[name], best = metrics.class_metrics(scores, labels, maps, masks, with_thresholds=True,
                                                    **pixel_args)
    with warnings.catch_warnings(action="ignore"):  # the same class's NaNs: said once above
      half = metrics.class_metrics(scores, labels, maps, masks >= transforms.MASK_HALF, **pixel_args)
    thresholds[name] = float(best["image"])
    if name in calibration_records:
      cal = calibration.calibrate(cal_scores, cal_maps, e.target_fpr)
      pooled["calibration"].append(cal_scores)
      pooled["maps"].append(cal_maps[:, ::8, ::8])
    else:
      cal = calibration.from_test_labels(scores, labels, maps, best["image"])
    pooled["test_maps"].append(maps[:, ::8, ::8])  # the pooled fallback picks the normal ones
    calibrations[name] = cal
    pooled["scores"].append(scores)
    pooled["labels"].append(labels)
    inspection[name] = inspection_lib.class_results(
        scores, labels, [r.defect_type for r in class_records], cal, best["image"], per_class[name], half)
    names = [os.path.relpath(r.image_path, config.data.root or "/") for r in class_records]
    reader = pipeline.make_reader(class_records, config.data)  # packed or folders
    display = lambda i, rd=reader: transforms.display_image(rd.image(i), config.data, e.map_size)
    _save_pictures(config, out_dir, name, names, display, maps, masks, scores, labels, cal, best["image"])
    views.append(html_report.class_view(name, names, scores, labels, maps, masks, cal, best["image"],
                                        e.pictures_per_class, display))
  if jax.process_index() != 0:
    return {}
  all_scores, all_labels = np.concatenate(pooled["scores"]), np.concatenate(pooled["labels"])
  thresholds[POOLED] = float(metrics.image_f1_threshold(all_scores, all_labels))
  calibrations[POOLED] = (
      calibration.calibrate(np.concatenate(pooled["calibration"]), np.concatenate(pooled["maps"]),
                            e.target_fpr)
      if len(pooled["calibration"]) == len(per_class) else
      calibration.from_test_labels(all_scores, all_labels, np.concatenate(pooled["test_maps"]),
                                   thresholds[POOLED]))
  thresholds_file = storage.join(workdir, THRESHOLDS_FILE)
  storage.write_text(thresholds_file, json.dumps(thresholds, indent=2))
  calibration_file = calibration.save(workdir, calibrations)
  extra = {"random_encoder": bool(config.random_encoder), "target_fpr": e.target_fpr,
           "calibration": data_calibration.describe(config.data)}
  result = report.write_report(out_dir, per_class, dataset=config.data.layout, extra=extra, step=step,
                               inspection=inspection)
  html_file = html_report.write(out_dir, result, views)
  print(f"Report: {html_file} (.md, .json, .csv); pictures: {storage.join(out_dir, 'pictures')}; "
        f"thresholds and normalisation: {calibration_file} (F1-optimal on the test labels, for "
        f"comparison: {thresholds_file})")
  return result


def _save_pictures(config, out_dir, name, names, display, maps, masks, scores, labels, cal,
                   f1_threshold) -> None:
  k = config.eval.pictures_per_class
  if not k:
    return
  order = np.argsort(-labels, kind="stable")  # anomalous first, then normal ones
  chosen = list(order[:max(k - 1, 1)]) + list(np.nonzero(labels == 0)[0][:1])
  chosen = list(dict.fromkeys(int(i) for i in chosen))[:k]
  images = np.stack([display(i) for i in chosen])
  pic_dir = storage.join(out_dir, "pictures")
  pictures.save_strips(pic_dir, name, images, masks[chosen], maps[chosen], cal.threshold,
                       [names[i] for i in chosen], scale=cal.heat_range())
  pictures.save_score_plots(pic_dir, name, scores, labels, {"calibrated threshold": cal.threshold,
                                                            "F1-optimal (test labels)": f1_threshold})
