"""The eval loop, a short pipeline per class on the host that owns it: score (anomaly maps for
every test and calibration image), analyse (metrics, calibrated threshold, inspection figures),
draw (pictures); then, on the primary process, the pooled calibration and the reports (md,
json, csv, html)."""
import contextlib
import dataclasses
import json
import sys
import warnings

import jax
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
from dinomaly_jax.errors import DataError

THRESHOLDS_FILE = "thresholds.json"


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


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Before any scoring (and before a training run's step 0): eval.batch_size splits evenly
  over the processes and their local devices."""
  sharding.check_batch("eval.batch_size", config.eval.batch_size, jax.process_count(),
                       jax.local_device_count())


def check_records(config: ml_collections.ConfigDict, test_records) -> None:
  """A run without test images (normal-only) needs calibration images for its thresholds."""
  if not test_records and not data_calibration.enabled(config.data):
    raise DataError(f"{config.data.packed or config.data.root}: no test images (a normal-only run) and "
                    "no calibration split: set config.data.calibration.fraction (e.g. 0.2) or "
                    "config.data.calibration.folder, so that the thresholds come from normal images.")


def score_records(config, map_fn, variables, records, mesh, desc="eval"):
  """Maps, scores and masks (host numpy, in record order) of `records`, scored by this process
  alone on `mesh` (its own devices; `variables` replicated there), in batches of its share of
  eval.batch_size."""
  n = len(records)
  size = config.eval.map_size
  maps = np.zeros((n, size, size), np.float32)
  masks = np.zeros((n, config.data.mask_size, config.data.mask_size), np.uint8)
  scores = np.zeros((n,), np.float32)
  seen = np.zeros((n,), np.int32)
  batch = -(-config.eval.batch_size // jax.process_count())  # this host's share
  batches = pipeline.eval_iterator(records, config.data, batch_size=batch)
  for local in tqdm(batches, total=pipeline.num_eval_batches(n, batch, 1), desc=desc,
                    disable=not storage.is_primary(), dynamic_ncols=True, leave=False):
    g = sharding.global_batch({"image": local["image"]}, mesh, "eval.batch_size")
    b_maps, b_scores = jax.device_get(map_fn(variables, g["image"]))
    idx, valid = local["index"][local["valid"]], local["valid"].nonzero()[0]
    maps[idx], scores[idx], masks[idx] = b_maps[valid], b_scores[valid], local["mask"][valid]
    np.add.at(seen, idx, 1)
  if not np.all(seen == 1):
    raise RuntimeError(f"Evaluation scored {int((seen == 0).sum())} images never and "
                       f"{int((seen > 1).sum())} more than once; the eval pipeline is broken.")
  return maps, scores, masks


@dataclasses.dataclass
class ClassScores:
  """One class's scored images (host numpy, in record order)."""
  records: list  # the test records
  maps: np.ndarray  # (N, S, S)
  scores: np.ndarray  # (N,)
  masks: np.ndarray  # (N, M, M) uint8, 0..255
  labels: np.ndarray  # (N,) int32
  calibration_maps: np.ndarray | None  # (K, S, S) of the calibration images; None without them
  calibration_scores: np.ndarray | None  # (K,)


@dataclasses.dataclass
class ClassOutcome:
  """What evaluation concludes about one class."""
  metrics: dict  # the seven metrics
  f1_threshold: float  # the image score reaching I-F1max (test labels)
  calibration: calibration.ClassCalibration
  inspection: dict  # decisions, per defect type, both mask conventions


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


@dataclasses.dataclass
class _ClassResult:
  """What one host sends the primary process about a class it evaluated (small: no full maps)."""
  outcome: ClassOutcome
  pooled: dict  # the class's share of the pooled statistics (_Pooled.share)
  view: dict  # its part of report.html
  files: dict  # its pictures, {path: bytes}


def evaluate(config, workdir, model, variables, records, *, step, mesh) -> dict:
  """Scores every test record; the primary process writes the reports, thresholds, calibration
  and pictures, and returns the report (the others return {}).

  `variables`: the Dinomaly module's variables ({"params": {encoder, bottleneck, decoder}}).
  The calibration images (config.data.calibration) are scored too: they set the decision
  thresholds and the normalisation (calibration.py); without them the test labels do.
  Classes are spread over the hosts (class i on process i mod P): each host scores, analyses and
  draws its own classes on its own devices, so no host holds another's maps; only the small
  per-class results reach the primary process, which adds the pooled calibration and writes.
  """
  here = sharding.local_mesh(mesh)
  variables = sharding.to_local(variables, here)
  map_fn = make_map_fn(model, config)
  calibration_records = _by_class(data_index.build_records(config.data, "calibration"))
  if not records:
    return _calibrate_only(config, workdir, map_fn, variables, calibration_records, here)
  out_dir = storage.join(workdir, "eval")
  mine = {}
  for i, (name, class_records) in enumerate(sorted(_by_class(records).items())):
    if i % jax.process_count() != jax.process_index():
      continue  # another host's class
    scored = _score_class(config, map_fn, variables, class_records, calibration_records.get(name), here)
    outcome = _analyse_class(config.eval, scored, data_calibration.describe(config.data))
    with storage.captured_writes() as files:
      view = _draw_class(config, out_dir, name, scored, outcome)
    mine[name] = _ClassResult(outcome, _Pooled.share(scored), view, files)
  results = {name: r for host in sharding.gather_objects(mine) for name, r in host.items()}
  if not storage.is_primary():
    return {}
  pooled = _Pooled()
  for name in sorted(results):
    storage.write_captured(results[name].files)
    pooled.add(results[name].pooled)
  return _write_results(config, workdir, out_dir, step, {n: results[n].outcome for n in sorted(results)},
                        pooled, [results[n].view for n in sorted(results)])


def _calibrate_only(config, workdir, map_fn, variables, calibration_records, mesh) -> dict:
  """A normal-only run (no test images): calibration.json from the calibration images, no
  metrics and no report. Returns {}."""
  images_from = data_calibration.describe(config.data)
  if storage.is_primary():
    print("No test images (a normal-only run): evaluation skipped; the thresholds come from "
          f"the calibration images ({images_from}).", flush=True)
  calibrations, scores, maps = {}, [], []
  for name, records in sorted(calibration_records.items()):
    class_maps, class_scores, _ = score_records(config, map_fn, variables, records, mesh, desc=f"calibrate {name}")
    calibrations[name] = calibration.calibrate(class_scores, class_maps, config.eval.target_fpr, images_from)
    scores.append(class_scores)
    maps.append(class_maps[:, ::8, ::8])
  if not storage.is_primary():
    return {}
  calibrations[calibration.POOLED] = calibration.calibrate(
      np.concatenate(scores), np.concatenate(maps), config.eval.target_fpr, images_from)
  path = calibration.save(workdir, calibrations)
  for name, cal in calibrations.items():
    print(f"{name}: threshold {cal.threshold:.4g} ({calibration.guarantee_text(cal)})")
  for name, cal in calibrations.items():
    if calibration.shortfall_warning(name, cal):
      print(calibration.shortfall_warning(name, cal))
  print(f"Thresholds and normalisation: {path}", flush=True)
  return {}


def _score_class(config, map_fn, variables, class_records, calibration_records, mesh) -> ClassScores:
  """Maps and scores of a class's test images and of its calibration images, if any."""
  name = class_records[0].class_name
  maps, scores, masks = score_records(config, map_fn, variables, class_records, mesh, desc=f"eval {name}")
  cal_maps = cal_scores = None
  if calibration_records:
    cal_maps, cal_scores, _ = score_records(config, map_fn, variables, calibration_records, mesh,
                                            desc=f"calibrate {name}")
  labels = np.array([r.label for r in class_records], np.int32)
  return ClassScores(class_records, maps, scores, masks, labels, cal_maps, cal_scores)


def _analyse_class(eval_config, s: ClassScores, images_from: str = "") -> ClassOutcome:
  """Metrics, the F1-optimal threshold, the calibration and the inspection figures of a class."""
  pixel_args = dict(aupro=eval_config.aupro, aupro_max_fpr=eval_config.aupro_max_fpr,
                    aupro_thresholds=eval_config.aupro_thresholds)
  with _warnings_as_lines(s.records[0].class_name):
    class_metrics, best = metrics.class_metrics(s.scores, s.labels, s.maps, s.masks, with_thresholds=True,
                                                **pixel_args)
  with warnings.catch_warnings(action="ignore"):  # the same class's NaNs: said once above
    half = metrics.class_metrics(s.scores, s.labels, s.maps, s.masks >= transforms.MASK_HALF, **pixel_args)
  if s.calibration_scores is not None:
    cal = calibration.calibrate(s.calibration_scores, s.calibration_maps, eval_config.target_fpr, images_from)
  else:
    cal = calibration.from_test_labels(s.scores, s.labels, s.maps, best["image"])
  inspection = inspection_lib.class_results(
      s.scores, s.labels, [r.defect_type for r in s.records], cal, best["image"], class_metrics, half)
  return ClassOutcome(class_metrics, float(best["image"]), cal, inspection)


class _Pooled:
  """The statistics over all classes, for images of unknown class (calibration.POOLED)."""

  def __init__(self):
    self.scores, self.labels, self.test_maps = [], [], []
    self.calibration_scores, self.calibration_maps = [], []
    self.classes = 0

  @staticmethod
  def share(s: ClassScores) -> dict:
    """A class's contribution: its scores and labels, maps subsampled 8x on each axis."""
    with_calibration = s.calibration_scores is not None
    return {"scores": s.scores, "labels": s.labels,
            "test_maps": s.maps[:, ::8, ::8],  # the pooled fallback picks the normal ones
            "calibration_scores": s.calibration_scores if with_calibration else None,
            "calibration_maps": s.calibration_maps[:, ::8, ::8] if with_calibration else None}

  def add(self, share: dict) -> None:
    self.classes += 1
    self.scores.append(share["scores"])
    self.labels.append(share["labels"])
    self.test_maps.append(share["test_maps"])
    if share["calibration_scores"] is not None:
      self.calibration_scores.append(share["calibration_scores"])
      self.calibration_maps.append(share["calibration_maps"])

  def f1_threshold(self) -> float:
    return float(metrics.image_f1_threshold(np.concatenate(self.scores), np.concatenate(self.labels)))

  def calibration(self, target_fpr: float, images_from: str = "") -> calibration.ClassCalibration:
    """From every class's calibration images if every class has them, else the test labels."""
    if len(self.calibration_scores) == self.classes:
      return calibration.calibrate(np.concatenate(self.calibration_scores),
                                   np.concatenate(self.calibration_maps), target_fpr, images_from)
    return calibration.from_test_labels(np.concatenate(self.scores), np.concatenate(self.labels),
                                        np.concatenate(self.test_maps), self.f1_threshold())


def _draw_class(config, out_dir, name, s: ClassScores, outcome: ClassOutcome) -> dict:
  """The class's pictures (written) and its view for report.html (returned)."""
  e = config.eval
  names = [_shown_name(r.image_path, config.data.root) for r in s.records]
  reader = pipeline.make_reader(s.records, config.data)  # packed or folders
  display = lambda i: transforms.display_image(reader.image(i), config.data, e.map_size)
  _save_pictures(config, out_dir, name, names, display, s, outcome)
  return html_report.class_view(name, names, s.scores, s.labels, s.maps, s.masks, outcome.calibration,
                                outcome.f1_threshold, e.pictures_per_class, display)


def _shown_name(path: str, root: str) -> str:
  """An image's name in the reports: relative to the dataset root (a local path without one:
  to "/"; a URL outside the root: the URL)."""
  if storage.is_url(path):
    return storage.relpath(path, root) if root and path.startswith(root.rstrip("/") + "/") else path
  return storage.relpath(path, root or "/")


def _write_results(config, workdir, out_dir, step, outcomes, pooled: _Pooled, views) -> dict:
  """thresholds.json, calibration.json, the reports (md, json, csv, html); returns the report."""
  e = config.eval
  thresholds = {name: o.f1_threshold for name, o in outcomes.items()}
  thresholds[calibration.POOLED] = pooled.f1_threshold()
  calibrations = {name: o.calibration for name, o in outcomes.items()}
  calibrations[calibration.POOLED] = pooled.calibration(e.target_fpr, data_calibration.describe(config.data))
  thresholds_file = storage.join(workdir, THRESHOLDS_FILE)
  storage.write_shared(thresholds_file, json.dumps(thresholds, indent=2))
  calibration_file = calibration.save(workdir, calibrations)
  extra = {"random_encoder": bool(config.random_encoder), "target_fpr": e.target_fpr,
           "calibration": data_calibration.describe(config.data)}
  result = report.write_report(out_dir, {n: o.metrics for n, o in outcomes.items()},
                               dataset=config.data.layout, extra=extra, step=step,
                               inspection={n: o.inspection for n, o in outcomes.items()})
  html_file = html_report.write(out_dir, result, views)
  print(f"Report: {html_file} (.md, .json, .csv); pictures: {storage.join(out_dir, 'pictures')}; "
        f"thresholds and normalisation: {calibration_file} (F1-optimal on the test labels, for "
        f"comparison: {thresholds_file})")
  return result


def _save_pictures(config, out_dir, name, names, display, s: ClassScores, outcome: ClassOutcome) -> None:
  k = config.eval.pictures_per_class
  if not k:
    return
  cal = outcome.calibration
  order = np.argsort(-s.labels, kind="stable")  # anomalous first, then normal ones
  chosen = list(order[:max(k - 1, 1)]) + list(np.nonzero(s.labels == 0)[0][:1])
  chosen = list(dict.fromkeys(int(i) for i in chosen))[:k]
  images = np.stack([display(i) for i in chosen])
  pic_dir = storage.join(out_dir, "pictures")
  pictures.save_strips(pic_dir, name, images, s.masks[chosen], s.maps[chosen], cal.threshold,
                       [names[i] for i in chosen], scale=cal.heat_range())
  pictures.save_score_plots(pic_dir, name, s.scores, s.labels,
                            {"calibrated threshold": cal.threshold,
                             "F1-optimal (test labels)": outcome.f1_threshold})
