"""A newcomer's paths through the real command line: the help, the README's packed-data
recipe without data.root, a short run of the folder config, training a run further or
starting from its weights, and eval / predict / export that print nothing on stderr but
their progress bars.

Every test runs `python -m ...` as a subprocess and asserts on its output, exit code and files.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
# A tqdm bar (as eval, calibrate and predict draw them), or the blanks that clear one.
PROGRESS_BAR = re.compile(r"^(\w[\w ]*: +\d+%\|.*\| *\d+/\d+ \[.*\])?$")
# The README's TPU / SLURM recipe on the tiny generated data: a random ViT-S at 56 px,
# 4 steps, no data.root (only the pack).
TINY = ["--config.random_encoder=True", "--config.model.registers=0", "--config.data.crop=56",
        "--config.data.resize=64", "--config.data.workers=0", "--config.train.batch_size=4",
        "--config.eval.batch_size=8", "--config.eval.pictures_per_class=1"]


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, text=True, capture_output=True,
                        timeout=TIMEOUT)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _one_error_line(proc) -> str:
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: ")
  return line


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--helpfull"],
                                  ["--config=configs/folder.py", "--help"],
                                  ["--helpfull", "--workdir=/nonexistent/run"]])
def test_help_lists_the_modes_and_fields(args):
  proc = _ok(_run("dinomaly_jax.main", *args))
  out = proc.stdout
  assert proc.stderr == ""
  for mode in ("train", "eval", "predict", "export"):
    assert re.search(rf"^  {mode} +\S", out, re.M), out
  for field in ("data.root", "data.packed", "encoder_weights", "train.steps", "init_from", "predict.input"):
    assert re.search(rf"^  {re.escape(field)} +\S", out, re.M), (field, out)
  assert "--workdir" in out and "--config" in out
  every_field = "eval.aupro_thresholds" in out  # a field only --helpfull lists
  assert every_field == ("--helpfull" in args)
  if "--config=configs/folder.py" in args:  # the values are the config's, not the defaults
    assert "values of configs/folder.py" in out and re.search(r"^  data.layout +'folder'", out, re.M)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
  """The README's packed recipe on generated data: pack, then train on the pack alone."""
  base = tmp_path_factory.mktemp("packed")
  root = main_helpers.tiny_dataset(base / "data")
  pack, workdir = str(base / "pack"), str(base / "run")
  packing = _ok(_run("dinomaly_jax.data.pack", "--config=configs/mvtec.py", f"--config.data.root={root}",
                     f"--out={pack}", "--config.data.resize=64", "--workers=0"))
  shutil.rmtree(os.path.join(root, "brick", "train"))  # the run below reads the pack, not the folders
  training = _ok(_run("dinomaly_jax.main", "--config=configs/mvtec.py:vit=small", f"--workdir={workdir}",
                      f"--config.data.packed={pack}", "--config.train.steps=4", *TINY))
  return root, pack, workdir, packing, training


def test_packed_recipe_trains_without_data_root(packed_run):
  _, pack, workdir, packing, training = packed_run
  assert f"train with --config.data.packed={pack}" in packing.stdout
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["data"]["root"] == "" and config["data"]["packed"] == pack
  assert config["train"]["warmup_steps"] == 0  # min(100, 4 // 10): the short run warms up for 0 steps
  assert "I-AUROC" in training.stdout
  assert json.load(open(os.path.join(workdir, "eval", "report.json")))["step"] == 4
  assert "OpenCV" not in training.stderr and "Traceback" not in training.stderr


@pytest.mark.parametrize("mode", ["eval", "predict", "export"])
def test_eval_predict_export_print_only_progress_bars(packed_run, mode):
  """stderr holds nothing but progress bars: no orbax read-only warning, no TFDS OpenCV note."""
  root, _, workdir, _, _ = packed_run
  proc = _ok(_run("dinomaly_jax.main", f"--workdir={workdir}", f"--mode={mode}",
                  f"--config.predict.input={os.path.join(root, 'nut', 'test')}",
                  f"--config.predict.output={os.path.join(workdir, 'predictions_' + mode)}"))
  pieces = [p.strip() for p in re.split(r"[\r\n]|\x1b\[A", proc.stderr)]
  assert all(PROGRESS_BAR.match(p) for p in pieces), proc.stderr
  expected = {"eval": "Report: ", "predict": "Predicted 6 images", "export": "Exported the inference function"}[mode]
  assert expected in proc.stdout


def test_forty_step_folder_run_and_a_class_without_masks(tmp_path):
  """configs/folder.py with --config.train.steps=40: the warm-up follows (4 steps). The class
  without masks gets one warning line, not Python's UserWarning."""
  root = main_helpers.tiny_dataset(tmp_path / "data")
  shutil.rmtree(os.path.join(root, "nut", "ground_truth"))  # folder layout: masks are optional
  workdir = tmp_path / "run"
  proc = _ok(_run("dinomaly_jax.main", "--config=configs/folder.py:vit=small", f"--workdir={workdir}",
                  f"--config.data.root={root}", "--config.train.steps=40", "--config.train.log_every=2",
                  "--config.train.checkpoint_every=0", *TINY, "--config.data.crop=28", "--config.data.resize=32",
                  "--config.eval.pictures_per_class=0"))
  assert json.load(open(workdir / "config.json"))["train"]["warmup_steps"] == 4
  lr = {m["step"]: m["lr"] for m in map(json.loads, open(workdir / "metrics.jsonl")) if "lr" in m}
  # Step s trains at schedule(s - 1): the warm-up 0 -> 2e-3 over steps 1-4, then the cosine to 2e-4.
  assert lr[2] == pytest.approx(2e-3 / 3, rel=1e-6) and lr[4] == pytest.approx(2e-3, rel=1e-6)
  assert lr[40] == pytest.approx(2e-4 + 0.9e-3 * (1 + np.cos(np.pi * 35 / 36)), rel=1e-5)
  assert "UserWarning" not in proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
  assert warnings == ["warning: nut: Pixel metrics and AUPRO are NaN: the ground truth masks of the "
                      "class are all normal (or all anomalous)."], proc.stderr


def _checkpoint(workdir, step):
  """(step, bottleneck + decoder parameters) as stored in the checkpoint of `step`."""
  with warnings.catch_warnings(action="ignore"):  # orbax: shardings read from the checkpoint (one CPU here)
    stored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return int(stored["step"]), jax.device_get(stored["params"])


def test_train_further_by_growing_train_steps(packed_run, tmp_path):
  _, _, trained, _, _ = packed_run
  longer = str(tmp_path / "longer")
  shutil.copytree(trained, longer)
  # train.steps may grow; the schedule now spans the new length, and one line says so.
  proc = _ok(_run("dinomaly_jax.main", f"--workdir={longer}", "--config.train.steps=6",
                  "--config.train.stop_after=1"))
  assert "Training on from step 4 to train.steps=6 (was 4): the learning-rate schedule" in proc.stdout
  assert "spans 6 steps, so step 5 trains at lr 6.50e-04 where the 4-step schedule gave 2.00e-04" in proc.stdout
  assert json.load(open(os.path.join(longer, "config.json")))["train"]["steps"] == 6
  assert max(map(int, os.listdir(os.path.join(longer, "checkpoints")))) == 5
  # Shrinking is refused, naming the way to start a new run from these weights.
  line = _one_error_line(_run("dinomaly_jax.main", f"--workdir={longer}", "--config.train.steps=3"))
  assert "may only grow" in line and f"--config.init_from={longer}" in line


def test_init_from_starts_a_new_run_from_trained_weights(packed_run, tmp_path):
  """A new work directory from the trained weights: its first step trains at lr 1e-12 without
  weight decay, so its checkpoint holds the trained bottleneck and decoder (to 1e-9)."""
  _, pack, trained, _, _ = packed_run
  fresh = str(tmp_path / "fresh")
  proc = _ok(_run("dinomaly_jax.main", "--config=configs/mvtec.py:vit=small", f"--workdir={fresh}",
                  f"--config.data.packed={pack}", f"--config.init_from={trained}", "--config.train.steps=4",
                  "--config.train.stop_after=1", "--config.train.lr=1e-12", "--config.train.final_lr=0",
                  "--config.train.weight_decay=0", *TINY))
  assert f"Bottleneck and decoder start from step 4 of {trained} (config.init_from)" in proc.stdout
  (step_a, a), (step_b, b) = _checkpoint(trained, 4), _checkpoint(fresh, 1)
  assert (step_a, step_b) == (4, 1)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert diff <= 1e-9, diff
