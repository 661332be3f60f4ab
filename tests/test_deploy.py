"""ONNX and OpenVINO exports against the JAX prediction; the ONNX predictor in a venv without JAX.

A tiny trained work directory (ViT-S at 56, 2 steps) is exported once through the command line
(--config.export.format=openvino writes model.onnx and model.xml/.bin); ONNX Runtime and
OpenVINO (CPU) run it at two batch sizes (the batch dimension is symbolic). The predictor runs
in a fresh `python -m venv` holding only onnxruntime, numpy and pillow.
"""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
from PIL import Image

from dinomaly_jax import run
from dinomaly_jax import sharding
from dinomaly_jax.config import saved
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.training import model_state
from tests import main_helpers
from tests.test_main import data_root  # pylint: disable=unused-import  (a fixture: the tiny dataset)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICTOR = os.path.join(REPO, "dinomaly_jax", "inference", "onnx_predictor.py")
TIMEOUT = 600
CLASSES = ["brick", "nut", calibration.POOLED]  # one per probe image: each class's table row


def _main(*args):
  return subprocess.run([sys.executable, "-m", "dinomaly_jax.main", *args], cwd=REPO, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def exported(data_root, tmp_path_factory):
  """(config, workdir, export folder) of a tiny trained run exported as ONNX + OpenVINO."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = main_helpers.tiny_config(data_root, steps=2, warmup_steps=1, eval_every=0, checkpoint_every=0)
  config.eval.pictures_per_class = 0
  run.run(config, workdir)
  proc = _main(f"--workdir={workdir}", "--mode=export", "--config.export.format=openvino")
  assert proc.returncode == 0, proc.stdout
  out = os.path.join(workdir, "export")
  assert {"model.onnx", "model.xml", "model.bin", "export_info.json"} <= set(os.listdir(out))
  return saved.load(workdir), workdir, out


@pytest.fixture(scope="module")
def jax_free_python(tmp_path_factory):
  """A venv without the system's packages, with only onnxruntime, numpy and pillow."""
  venv = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT)
  python = str(venv / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", f"onnxruntime=={ort.__version__}", "numpy", "pillow"],
                 check=True, timeout=TIMEOUT)
  probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True, timeout=TIMEOUT)
  assert "No module named 'jax'" in probe.stderr, probe.stderr
  return python


def _probe_images(data_root, config):
  test_dir = os.path.join(data_root, "brick", "test")
  paths = sorted(os.path.join(test_dir, d, p) for d in os.listdir(test_dir)
                 for p in os.listdir(os.path.join(test_dir, d)))[:3]
  return np.stack([transforms.preprocess_image(transforms.load_image(p), config.data) for p in paths])


def _check_outputs(outputs, maps, scores, workdir, rows):
  """Runtime outputs of `rows` of the probe batch against the JAX maps and scores."""
  cals = calibration.load(workdir)
  # Measured: maps and scores within 3.0e-7 (ONNX Runtime) and 1.8e-7 (OpenVINO, f32) of JAX's.
  np.testing.assert_allclose(outputs["maps"], maps[rows], rtol=0, atol=1e-5)
  np.testing.assert_allclose(outputs["scores"], scores[rows], rtol=0, atol=1e-5)
  for i, row in enumerate(rows):
    c = cals[CLASSES[row]]  # normalised by (x - center) / (threshold - center): errors / scale
    np.testing.assert_allclose(outputs["normalised_maps"][i], c.normalise(maps[row]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(outputs["normalised_scores"][i], c.normalise(scores[row]), rtol=0, atol=1e-4)
    assert outputs["anomalous"][i] == (scores[row] >= c.threshold)


def test_onnx_runtime_and_openvino_give_the_jax_maps_scores_and_decisions(exported, data_root):
  config, workdir, out = exported
  images = _probe_images(data_root, config)
  model, state = model_state.load_trained(config, workdir, sharding.make_mesh())
  maps, scores = (np.asarray(x) for x in evaluate.make_map_fn(model, config)(model_state.variables(state), images))
  ids = np.arange(len(CLASSES), dtype=np.int32)  # export_info's classes: brick, nut, pooled
  session = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]
  # OpenVINO picks bfloat16 on CPUs with AMX unless told f32 (maps then differ by ~1e-3).
  compiled = ov.Core().compile_model(os.path.join(out, "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
  for rows in ([0, 1, 2], [2]):  # two batch sizes through one file
    feed = {"images": images[rows], "class_ids": ids[rows]}
    _check_outputs(dict(zip(names, session.run(None, feed))), maps, scores, workdir, rows)
    _check_outputs({k.get_any_name(): v for k, v in compiled(feed).items()}, maps, scores, workdir, rows)


def test_an_unknown_export_format_is_one_line(exported):
  _, workdir, _ = exported
  proc = _main(f"--workdir={workdir}", "--mode=export", "--config.export.format=tflite")
  assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout
  errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "export.format" in errors[0] and "'onnx'" in errors[0], proc.stdout


def test_the_predictor_without_jax_writes_what_predict_writes(exported, data_root, jax_free_python, tmp_path):
  config, workdir, out = exported
  c = config.copy_and_resolve_references()
  c.mode = "predict"
  c.predict.input = _inputs(data_root, tmp_path / "inputs")
  c.predict.output = str(tmp_path / "jax")
  c.predict.save_maps = True
  run.run(c, workdir)
  proc = subprocess.run([jax_free_python, PREDICTOR, f"--export={out}", f"--input={c.predict.input}",
                         f"--output={tmp_path / 'onnx'}", "--batch-size=4", "--save-maps"],
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr
  assert "8 images:" in proc.stdout
  tables = []
  for side in ("jax", "onnx"):
    with open(tmp_path / side / "predictions.csv") as f:
      reader = csv.DictReader(f)
      tables.append((reader.fieldnames, list(reader)))
  (jax_columns, jax_rows), (onnx_columns, onnx_rows) = tables
  assert onnx_columns == jax_columns and len(onnx_rows) == len(jax_rows) == 8
  for a, b in zip(jax_rows, onnx_rows):
    for key in ("image", "class", "threshold", "threshold_from", "decision"):
      assert a[key] == b[key], key
    # Measured: scores within 1.2e-7, normalised scores within 4.2e-6.
    assert abs(float(a["score"]) - float(b["score"])) <= 1e-4
    assert abs(float(a["normalised_score"]) - float(b["normalised_score"])) <= 1e-4
    jax_map, onnx_map = np.load(a["heatmap"].replace("_heatmap.png", "_map.npy")), \
        np.load(b["heatmap"].replace("_heatmap.png", "_map.npy"))
    assert onnx_map.shape == jax_map.shape == transforms.load_image(a["image"]).shape[:2]
    np.testing.assert_allclose(onnx_map, jax_map, rtol=0, atol=1e-5)  # measured <= 3.3e-7
    jax_picture, onnx_picture = np.asarray(Image.open(a["heatmap"])), np.asarray(Image.open(b["heatmap"]))
    assert onnx_picture.shape == jax_picture.shape
    # Same colours: a pixel may change only where its map value sits on a colour step.
    assert (onnx_picture != jax_picture).any(axis=-1).mean() <= 1e-3


def _inputs(data_root, folder) -> str:
  """The nut test images, plus two of other sizes and modes: 16-bit grey 90x50, palette 40x70."""
  shutil.copytree(os.path.join(data_root, "nut", "test"), folder / "nut")
  rgb = transforms.load_image(os.path.join(data_root, "nut", "test", "good", "000.png"))
  grey = rgb[..., 0].astype(np.uint16) * 257
  Image.fromarray(np.resize(grey, (50, 90))).save(folder / "nut" / "wide16.png")
  Image.fromarray(np.resize(rgb, (70, 40, 3))).convert("P").save(folder / "nut" / "palette.png")
  return str(folder)


def test_the_predictor_reports_a_missing_export_in_one_line(jax_free_python, data_root, tmp_path):
  proc = subprocess.run([jax_free_python, PREDICTOR, f"--export={tmp_path}", f"--input={data_root}",
                         f"--output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "export_info.json: not found" in proc.stderr
