"""The command line as a user meets it: one work directory, one-line errors, clean interrupts.

Every test runs `python -m dinomaly_jax.main` as a subprocess and asserts on its output,
exit code and files.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests import main_helpers
from tests.test_encoder_weights import official_pth  # pylint: disable=unused-import  (a fixture: DINOv2 ViT-S/14, no registers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600


def _main(*args, env=None, **kwargs):
  """Runs the main job; stdout and stderr merged (their order is what the user sees)."""
  return subprocess.run([sys.executable, "-m", "dinomaly_jax.main", *args], cwd=REPO, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT,
                        env={**os.environ, **(env or {})}, **kwargs)


def _one_error_line(proc) -> str:
  """The single `error:` line of a failed run (no traceback)."""
  assert proc.returncode == 1, proc.stdout
  assert "Traceback" not in proc.stdout, proc.stdout
  errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stdout
  return errors[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """The tiny dataset plus what real folders hold: stray files and an empty class folder."""
  root = main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))
  for stray in ("brick/train/good/notes.txt", "brick/train/good/.DS_Store", "nut/test/Thumbs.db"):
    open(os.path.join(root, stray), "w").write("not an image")
  os.makedirs(os.path.join(root, "extra", "train", "good"))
  return root


def test_first_hour_train_then_predict_with_the_saved_config(data_root, tmp_path):
  """One training run (a module fixture would run once per xdist worker), then its work
  directory used the way the README says: --workdir and the fields that may change."""
  workdir = str(tmp_path / "run")
  proc = _main(f"--config=tests/tiny_config.py:{data_root}", f"--workdir={workdir}",
               "--config.data.workers=1", "--config.train.eval_every=0",
               "--config.data.calibration.fraction=0.0")  # every train/good image is trained on
  out = proc.stdout
  assert proc.returncode == 0, out
  # Stray files and the empty class folder: one warning naming them; hidden files not named.
  warnings = [line for line in out.splitlines() if "not images" in line]
  assert len(warnings) == 1, out
  for name in ("brick/train/good/notes.txt", "nut/test/Thumbs.db", "extra/"):
    assert name in warnings[0]
  assert ".DS_Store" not in out
  assert "on 16 images of 2 classes" in out  # 8 training images per class, nothing else
  # Progress: a compile line before the bar; the bar counts from step 1; its loss is the
  # logged loss of the step it names.
  assert out.index("Compiling the train step...") < out.index("train:")
  assert "1/6" in out
  logged = {m["step"]: m["loss"] for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "loss" in m}
  shown = re.findall(r"step (\d+): loss ([0-9.]+)", out)
  assert shown and {int(s) for s, _ in shown} <= set(logged)
  for step, loss in shown:
    assert float(loss) == pytest.approx(logged[int(step)], abs=5e-5)
  assert "leaked" not in out and "Traceback" not in out  # grain workers shut down cleanly

  predictions = tmp_path / "predictions"
  proc = _main(f"--workdir={workdir}", "--mode=predict",
               f"--config.predict.input={os.path.join(data_root, 'nut', 'test')}",
               f"--config.predict.output={predictions}")
  assert proc.returncode == 0, proc.stdout
  assert re.search(r"Predicted 6 images in [0-9.]+ s \([0-9.]+ images/s", proc.stdout)
  rows = list(csv.DictReader(open(predictions / "predictions.csv")))
  assert len(rows) == 6 and {r["class"] for r in rows} == {"nut"}

  line = _one_error_line(_main(f"--workdir={workdir}", "--mode=predict",
                               "--config.model.decoder_depth=10", "--config.predict.input=x"))
  assert "--config.model.decoder_depth=10" in line and "decoder_depth=8" in line


def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(data_root, tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{data_root}",
       f"--workdir={tmp_path}", "--config.data.workers=1", "--config.train.steps=1000",
       "--config.train.eval_every=0", "--config.train.checkpoint_every=0"],
      cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seen = ""
  while "2/1000" not in seen:  # a couple of steps done: the workers are running
    char = proc.stdout.read(1)
    assert char, seen
    seen += char
  proc.send_signal(signal.SIGINT)
  rest, _ = proc.communicate(timeout=60)
  out = seen + rest
  assert proc.returncode == 128 + signal.SIGINT, out
  steps = os.listdir(tmp_path / "checkpoints")
  assert len(steps) == 1 and int(steps[0]) >= 2
  assert f"SIGINT: stopped after step {steps[0]}; its checkpoint is saved. Resume with: " \
         f"python -m dinomaly_jax.main --workdir={tmp_path}" in out
  assert "Traceback" not in out and "leaked" not in out


def test_config_mistakes_are_one_line(data_root, tmp_path):
  cfg = f"--config=tests/tiny_config.py:{data_root}"
  line = _one_error_line(_main(cfg, f"--workdir={tmp_path}", "--config.train.learning_rate=1e-3"))
  assert line == ("error: --config.train.learning_rate: unknown config field; closest: "
                  "train.lr, train.amsgrad, train.weight_decay.")
  line = _one_error_line(_main(cfg, f"--workdir={tmp_path}", "--config.train.lr=fast"))
  assert "--config.train.lr=fast" in line and "could not convert string to float" in line
  line = _one_error_line(_main(cfg, f"--workdir={tmp_path}", "--config.train.steps=0"))
  assert line == "error: config.train.steps must be a positive integer, got 0."
  line = _one_error_line(_main(f"--config=tests/tiny_config.py:{tmp_path / 'nothing'}",
                               f"--workdir={tmp_path / 'w'}"))
  assert f"{tmp_path / 'nothing'}: dataset root folder not found" in line
  assert not os.path.exists(tmp_path / "w")  # nothing written before every check passed
  verbose = _main(cfg, f"--workdir={tmp_path}", "--config.train.learning_rate=1e-3",
                  env={"DINOMALY_JAX_VERBOSE": "1"})
  assert "Traceback" in verbose.stdout and verbose.returncode == 1


def test_weights_name_the_architecture_and_bad_weights_are_one_line(official_pth, data_root, tmp_path):
  env = {"DINOMALY_JAX_CACHE": str(tmp_path / "cache")}
  common = ["--config=configs/folder.py", f"--config.data.root={data_root}", "--config.data.crop=28",
            "--config.data.resize=32"]
  # An explicit register count is checked against the weights; nothing is written.
  line = _one_error_line(_main(*common, f"--workdir={tmp_path / 'w'}", f"--config.encoder_weights={official_pth}",
                               "--config.model.registers=4", env=env))
  assert "holds dinov2 ViT-small with 0 registers" in line and "config.model.registers" in line
  assert not os.path.exists(tmp_path / "w")
  # Without it, size and registers come from the weights: the run gets past every check
  # and stops only because an encoder-only checkpoint cannot be evaluated untrained.
  line = _one_error_line(_main(*common, f"--workdir={tmp_path / 'w'}", f"--config.encoder_weights={official_pth}",
                               "--mode=eval", env=env))
  assert "No checkpoint in" in line and "train there first" in line
  corrupt = tmp_path / "corrupt.pth"
  corrupt.write_bytes(open(official_pth, "rb").read()[:100_000])
  line = _one_error_line(_main(*common, f"--workdir={tmp_path / 'w'}", f"--config.encoder_weights={corrupt}",
                               env=env))
  assert line.startswith(f"error: config.encoder_weights: Cannot read checkpoint {corrupt} (")
  assert not os.path.exists(tmp_path / "w")
