"""Work directories, packs, weights and prediction inputs on an object store (a GCS emulator).

The README's pod recipe, run as written: every command is the real command line, with
its paths on gs://; the two-process run has only the pack (the image folders are
deleted) and each process its own cache folder (its "local disk").
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from dinomaly_jax import storage
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.inference import exported_model
from tests import main_helpers
from tests import object_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = f"gs://{object_store.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
  with object_store.gcs_emulator() as env, object_store.environment(env):
    yield env


def _start(args, env, cache, extra_env=None):
  cmd = [sys.executable, *args]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", DINOMALY_JAX_CACHE=str(cache), **env,
                  **(extra_env or {}))
  return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, ok=True):
  out, _ = proc.communicate(timeout=600)
  assert (proc.returncode == 0) == ok, out
  return out


def _main(config_arg, workdir, *flags):
  return ["-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{config_arg}",
          f"--workdir={workdir}", *flags]


def _names(url):
  return {p.name for p in storage.as_path(url).iterdir()} if storage.as_path(url).exists() else set()


def test_train_resume_predict_export_with_the_workdir_on_gcs(gcs, tmp_path):
  root = main_helpers.tiny_dataset(tmp_path / "data")
  workdir = f"{RUN}/single"
  cache = tmp_path / "cache"
  no_eval_at_3 = "--config.train.eval_every=0"  # the final evaluation only (tests/test_main.py: at the resumed step)
  first = _finish(_start(_main(root, workdir, "--config.train.stop_after=3", no_eval_at_3), gcs, cache))
  assert "Stopped after step 3" in first
  assert _names(f"{workdir}/checkpoints") == {"3"}
  resumed = _finish(_start(_main(root, workdir, no_eval_at_3), gcs, cache))
  assert "Resumed from the checkpoint of step 3" in resumed and "I-AUROC" in resumed
  assert {"config.json", "encoder.json", "metrics.jsonl", "thresholds.json", "calibration.json",
          "checkpoints", "tensorboard", "eval"} <= _names(workdir)
  assert _names(f"{workdir}/checkpoints") == {"3", "6"}
  steps = [json.loads(line)["step"] for line in storage.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 3, 4, 6, 6]  # 2 and 3 before the stop, 4 and 6 after (6: losses, eval/)
  assert len([n for n in _names(f"{workdir}/tensorboard") if n.startswith("events.")]) == 2
  report = json.loads(storage.as_path(f"{workdir}/eval/report.json").read_text())
  assert report["step"] == 6 and set(report["classes"]) == {"brick", "nut"}
  assert "scores.png" in _names(f"{workdir}/eval/pictures/brick")
  _assert_calibrated_report(workdir)

  # Prediction inputs and outputs on the object store, export read back from it.
  for name in ("000.png", "001.png"):
    (storage.as_path(f"{RUN}/new/nut") / name).write_bytes(open(os.path.join(root, "nut", "test", "good", name), "rb").read())
  _finish(_start(_main(root, workdir, "--mode=predict", f"--config.predict.input={RUN}/new/*/*.png"),
                 gcs, cache))
  rows = list(csv.DictReader(io.StringIO(storage.as_path(f"{workdir}/predictions/predictions.csv").read_text())))
  assert [r["image"] for r in rows] == [f"{RUN}/new/nut/000.png", f"{RUN}/new/nut/001.png"]
  assert all(r["class"] == "nut" and storage.as_path(r["heatmap"]).exists() for r in rows)
  nut = calibration.load(workdir)["nut"]  # read back from gs://
  assert all(float(r["threshold"]) == nut.threshold for r in rows)
  assert "predictions.csv.parts" not in _names(f"{workdir}/predictions")  # the part files joined, removed
  again = _finish(_start(_main(root, workdir, "--mode=predict", f"--config.predict.input={RUN}/new/*/*.png"),
                         gcs, cache))
  assert "Resuming: 2 of 2 images already have a row" in again  # read back from gs://
  assert len(list(csv.DictReader(io.StringIO(storage.as_path(f"{workdir}/predictions/predictions.csv").read_text())))) == 2
  _finish(_start(_main(root, workdir, "--mode=export"), gcs, cache))
  fn, info = exported_model.load(f"{workdir}/export")
  image = transforms.preprocess_image(transforms.load_image(rows[0]["image"]), main_helpers.tiny_config(root).data)
  out = fn(image[None], "nut")
  assert info["step"] == 6
  # The exported function scores the image as predict did (same weights, XLA attention).
  np.testing.assert_allclose(out["scores"][0], float(rows[0]["score"]), rtol=1e-4)
  np.testing.assert_allclose(out["normalised_scores"][0], float(rows[0]["normalised_score"]), rtol=1e-4, atol=1e-5)
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing landed in a local "gs:" folder


def _assert_calibrated_report(workdir):
  """calibration.json (thresholds from the calibration images) and report.html, with its
  images embedded, landed in the work directory on gs://."""
  saved = json.loads(storage.as_path(f"{workdir}/calibration.json").read_text())
  assert set(saved) == {"brick", "nut", calibration.POOLED}
  assert all(c["source"] == calibration.FROM_CALIBRATION for c in saved.values())
  page = storage.as_path(f"{workdir}/eval/report.html").read_text()
  assert page.startswith("<!DOCTYPE html>") and 'id="class-brick"' in page and 'id="class-nut"' in page
  assert page.count('src="data:image/jpeg;base64,') >= 2  # the image tiles of both classes


def _slurm_job_id() -> int:
  """A job id whose coordinator port (jax: 61440 + id mod 4096) is free on this machine."""
  for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
    if portpicker.is_port_free(int(port)):
      return int(port) - 61440
  raise RuntimeError("no free port in 61440..65535")


def test_two_pack_only_hosts_with_the_workdir_on_gcs(gcs, tmp_path):
  root = main_helpers.tiny_dataset(tmp_path / "data")
  pack = f"{RUN}/pack"
  out = _finish(_start(["-m", "dinomaly_jax.data.pack", f"--config=tests/tiny_config.py:{root}",
                        f"--out={pack}", "--workers=0"], gcs, tmp_path / "cache_packer"))
  assert "Packed" in out
  shutil.rmtree(root)  # the hosts have the pack only
  workdir = f"{RUN}/pod"
  flags = [f"--config.data.packed={pack}", "--config.data.cache_features=True",
           "--config.train.eval_every=0"]  # the final evaluation only (tests/test_pod_modes.py: at the resumed step)

  def two_processes(*extra):  # as `srun` starts them: jax.distributed.initialize() reads SLURM_*
    job = str(_slurm_job_id())
    procs = [_start(_main(root, workdir, *flags, *extra), gcs, tmp_path / f"host{i}",
                    {"SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "127.0.0.1",
                     "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in range(2)]
    return [_finish(p) for p in procs]

  first = two_processes("--config.train.stop_after=3")
  assert "Stopped after step 3" in first[0]
  # 12 training images (the calibration split holds 2 of each class's 8 out): 3 global batches
  # of 4; each host holds its 2 rows of each, 6 rows.
  assert "Caching encoder features: 12 images" in first[0]
  assert "per process (6 rows: this process's share of 2)" in first[0]
  resumed = two_processes()
  assert "Resumed from the checkpoint of step 3" in resumed[0] and "I-AUROC" in resumed[0]
  assert "I-AUROC" not in resumed[1]  # process 0 alone writes the report
  for host in (0, 1):  # each host made its own copy of the pack, on its own disk
    assert os.listdir(tmp_path / f"host{host}" / "packs")
  report = json.loads(storage.as_path(f"{workdir}/eval/report.json").read_text())
  assert report["step"] == 6 and set(report["classes"]) == {"brick", "nut"}
  pictures = _names(f"{workdir}/eval/pictures/brick")  # 2 strips (config.eval.pictures_per_class), scores
  assert len(pictures) == 3 and "scores.png" in pictures and all(n.endswith(".png") for n in pictures)
  _assert_calibrated_report(workdir)  # its images read from the pack, the folders being gone
  assert _names(f"{workdir}/checkpoints") == {"3", "6"}


def test_prediction_rows_on_gcs_are_part_files_joined_at_the_end(gcs):
  """Objects cannot be appended: each batch is a part file; a killed run's parts are read back
  (resume), and the end of a run joins them into predictions.csv and deletes them."""
  from dinomaly_jax.inference import prediction_csv  # pylint: disable=g-import-not-at-top
  out = f"{RUN}/prediction_parts"
  sink = prediction_csv.PredictionCsv(out, resume=True)
  sink.append([{"image": "a.png", "decision": "normal"}])
  sink.append([{"image": "b.png", "decision": "anomalous"}])
  assert len(_names(f"{out}/{prediction_csv.PARTS}")) == 2  # two batches, two PUTs, no join yet
  resumed = prediction_csv.PredictionCsv(out, resume=True)  # the first run was killed here
  assert resumed.done == {"a.png", "b.png"} and resumed.skipped == 2
  resumed.append([{"image": "c.png", "decision": "normal"}])
  path = resumed.close()
  rows = list(csv.DictReader(io.StringIO(storage.as_path(path).read_text())))
  assert [(r["image"], r["decision"]) for r in rows] == [("a.png", "normal"), ("b.png", "anomalous"),
                                                         ("c.png", "normal")]
  assert _names(out) == {prediction_csv.CSV_FILE}  # the parts are gone
  assert prediction_csv.PredictionCsv(out, resume=True).done == {"a.png", "b.png", "c.png"}
