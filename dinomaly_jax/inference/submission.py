"""MVTec AD 2's unlabelled test splits -> the files its evaluation server expects (--mode=submit).

  <out>/anomaly_images/<class>/<split>/<stem>.tiff               single-channel float16 map,
                                                                  full image resolution
  <out>/anomaly_images_thresholded/<class>/<split>/<stem>.png    single-channel uint8, 0 or 255
  <out>/scores.csv                                               class, split, image, score, decision

`<stem>` is the image's own (000_regular, 000_mixed), `<split>` each of
config.predict.submission_splits (test_private, test_private_mixed). The format is the one
MVTec's `check_and_prepare_data_for_upload.py` checks (MVTec AD 2 public code utilities);
run that checker on <out> before uploading. The thresholded image marks the pixels whose map
value reaches the class's calibrated threshold (calibration.json, set on validation/good).
"""
import csv
import io
import os

import numpy as np
from PIL import Image
import tifffile

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import mvtec_ad2
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.errors import DataError
from dinomaly_jax.evaluation import anomaly_map
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.inference import image_batches
from dinomaly_jax.training import model_state

MAPS_DIR, MASKS_DIR = "anomaly_images", "anomaly_images_thresholded"


def write_submission(config, workdir: str) -> list[dict]:
  """Scores every image of the unlabelled splits; writes the maps, masks and scores.csv."""
  if config.data.layout != "mvtec_ad2":
    raise ConfigError(f"config.mode='submit' writes MVTec AD 2 submissions; config.data.layout must "
                      f"be 'mvtec_ad2', got {config.data.layout!r}.")
  classes = data_index.list_classes(config.data)
  jobs = [(name, split, path) for name in classes for split in config.predict.submission_splits
          for path in mvtec_ad2.unlabelled_images(config.data.root, name, split)]
  thresholds = calibration.load(workdir)
  out_dir = config.predict.output or storage.join(workdir, "submission")
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh)
  map_fn, variables = evaluate.make_map_fn(model, config), model_state.variables(state)
  bs = config.eval.batch_size
  rows = []
  batches = image_batches.batches([p for _, _, p in jobs], config.data, bs)
  for start, batch in zip(range(0, len(jobs), bs), batches):
    chunk, originals = jobs[start:start + bs], batch.originals
    unreadable = [e for e in batch.errors if e]
    if unreadable:
      raise DataError(unreadable[0])
    images = sharding.global_batch({"image": batch.images}, mesh, "eval.batch_size")["image"]
    maps, scores = map_fn(variables, images)
    maps, scores = np.asarray(maps), np.asarray(scores)
    for (name, split, path), original, amap, score in zip(chunk, originals, maps, scores):
      cal = thresholds[name]
      full = anomaly_map.full_resolution_map(amap[None], original.shape[:2], config.data)[0]  # (H, W)
      stem = os.path.splitext(storage.basename(path))[0]
      storage.write_shared_with(storage.join(out_dir, MAPS_DIR, name, split, stem + ".tiff"),
                                lambda f, m=full: tifffile.imwrite(f, m.astype(np.float16)))
      mask = np.where(full >= cal.threshold, 255, 0).astype(np.uint8)
      storage.write_shared_with(storage.join(out_dir, MASKS_DIR, name, split, stem + ".png"),
                                lambda f, m=mask: Image.fromarray(m).save(f, format="PNG"))
      rows.append({"class": name, "split": split, "image": path, "score": float(score),
                   "threshold": cal.threshold,
                   "decision": "anomalous" if score >= cal.threshold else "normal"})
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  storage.write_shared(storage.join(out_dir, "scores.csv"), table.getvalue())
  print(f"{len(rows)} images of {len(classes)} classes ({', '.join(config.predict.submission_splits)}) "
        f"-> {out_dir} ({MAPS_DIR}/, {MASKS_DIR}/, scores.csv)", flush=True)
  return rows
