"""The eval loop: anomaly maps for every test image, metrics per class, report, pictures."""
import json
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from tqdm import tqdm

from dinomaly_jax import sharding
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import anomaly_map
from dinomaly_jax.evaluation import metrics
from dinomaly_jax.evaluation import pictures
from dinomaly_jax.evaluation import report

THRESHOLDS_FILE = "thresholds.json"
POOLED = "__all__"  # the threshold over all classes' test images, for images of unknown class


def make_map_fn(model, config: ml_collections.ConfigDict):
  """jit: (variables, images (B, H, W, 3)) -> (maps (B, S, S), scores (B,))."""
  e = config.eval

  @jax.jit
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


def evaluate(config, workdir, model, variables, records, *, step, mesh) -> dict:
  """Scores every test record, writes the report, thresholds and pictures (process 0).

  `variables`: the Dinomaly module's variables ({"params": {encoder, bottleneck, decoder}}).
  """
  map_fn = make_map_fn(model, config)
  by_class = {}
  for r_i, r in enumerate(records):
    by_class.setdefault(r.class_name, []).append(r_i)
  per_class, thresholds = {}, {}
  all_scores, all_labels = [], []
  out_dir = os.path.join(workdir, "eval")
  for name, ids in sorted(by_class.items()):
    class_records = [records[i] for i in ids]
    maps, scores, masks = predict_records(config, map_fn, variables, class_records, mesh, desc=f"eval {name}")
    if jax.process_index() != 0:
      continue
    labels = np.array([r.label for r in class_records], np.int32)
    per_class[name], best = metrics.class_metrics(
        scores, labels, maps, masks, aupro=config.eval.aupro, with_thresholds=True,
        aupro_max_fpr=config.eval.aupro_max_fpr, aupro_thresholds=config.eval.aupro_thresholds)
    thresholds[name] = float(best["image"])
    all_scores.append(scores)
    all_labels.append(labels)
    # Regions shown: the pixel F1-optimal threshold where masks exist, else the image one.
    shown = best["pixel"] if np.isfinite(best["pixel"]) else best["image"]
    _save_pictures(config, out_dir, name, class_records, maps, masks, scores, labels, shown)
  if jax.process_index() != 0:
    return {}
  thresholds[POOLED] = float(metrics.image_f1_threshold(np.concatenate(all_scores), np.concatenate(all_labels)))
  with open(os.path.join(workdir, THRESHOLDS_FILE), "w") as f:
    json.dump(thresholds, f, indent=2)
  extra = {"random_encoder": bool(config.random_encoder)}
  result = report.write_report(out_dir, per_class, dataset=config.data.layout, extra=extra, step=step)
  print(f"Report: {os.path.join(out_dir, 'report.md')} (.json, .csv); pictures: "
        f"{os.path.join(out_dir, 'pictures')}; thresholds: {os.path.join(workdir, THRESHOLDS_FILE)}")
  return result


def _save_pictures(config, out_dir, name, records, maps, masks, scores, labels, threshold) -> None:
  k = config.eval.pictures_per_class
  if not k:
    return
  order = np.argsort(-labels, kind="stable")  # anomalous first, then normal ones
  chosen = list(order[:max(k - 1, 1)]) + list(np.nonzero(labels == 0)[0][:1])
  chosen = list(dict.fromkeys(int(i) for i in chosen))[:k]
  images = np.stack([transforms.display_image(records[i].image_path, config.data, config.eval.map_size)
                     for i in chosen])
  names = [os.path.relpath(records[i].image_path, config.data.root or "/") for i in chosen]
  pic_dir = os.path.join(out_dir, "pictures")
  pictures.save_strips(pic_dir, name, images, masks[chosen], maps[chosen], threshold, names)
  pictures.save_score_plots(pic_dir, name, scores, labels)
