"""Every mode on several JAX processes (CPU, a local coordinator) with a real converted encoder.

The encoder is an official-format DINOv2 ViT-S/14 (4 registers) state dict built by the PyPI
`dinov2` package, every tensor random. Each process has its own cache folder, as hosts that see
only their own disk: each converts the .pth itself, after the distributed start-up.
"""
import csv
import functools
import json
import os
import shutil
import subprocess
import sys

from dinov2.layers.block import Block as TorchDinoBlock
from dinov2.layers.mlp import Mlp as TorchMlp
from dinov2.models import vision_transformer as dinov2_vit
import numpy as np
import portpicker
import pytest
import torch

from dinomaly_jax.inference import prediction_csv
from dinomaly_jax.weights import converted
from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 384  # ViT-S


def _randomised(module, prefix):
  return {f"{prefix}{k}": 0.2 * torch.randn(v.shape) for k, v in module.state_dict().items()}


@functools.cache
def _encoder_state_dict():
  """An official DINOv2 ViT-S/14 reg4 state dict, every tensor (LayerScale too) random."""
  torch.manual_seed(0)
  encoder = dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
  state = _randomised(encoder, "")
  state["register_tokens"] = torch.randn(1, 4, D)  # dinov2reg (PyPI dinov2 predates it)
  return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(DINOv2 .pth, trained reference ViTill .pth with the same encoder, dataset root)."""
  root = tmp_path_factory.mktemp("pod_modes")
  encoder_file = root / "dinov2_vits14_reg4_pretrain.pth"
  torch.save(_encoder_state_dict(), encoder_file)
  torch.manual_seed(1)
  vitill = {f"encoder.{k}": v for k, v in _encoder_state_dict().items()}
  vitill.update(_randomised(torch.nn.ModuleList([TorchMlp(D, 4 * D, D)]), "bottleneck."))
  vitill.update(_randomised(torch.nn.ModuleList([TorchDinoBlock(D, 6, qkv_bias=True) for _ in range(8)]),
                            "decoder."))
  vitill_file = root / "vitill_vits14_reg4.pth"
  torch.save(vitill, vitill_file)
  return encoder_file, vitill_file, main_helpers.tiny_dataset(root / "data")


def _run(root, workdir, caches, *args, devices=1):
  """Runs the main job on len(caches) processes (each its own cache folder); their outputs.
  Without a dataset `root`, the work directory's saved configuration is used (resume, export)."""
  port = portpicker.pick_unused_port()
  procs = []
  for i, cache in enumerate(caches):
    env = dict(os.environ, JAX_PLATFORMS="cpu", DINOMALY_JAX_CACHE=str(cache),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if len(caches) > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(len(caches)),
                 JAX_PROCESS_ID=str(i))
    config = [f"--config=tests/tiny_config.py:{root}"] if root else []
    cmd = [sys.executable, "-m", "dinomaly_jax.main", *config, f"--workdir={workdir}", *args]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


def _pretrained(weights_file):
  return ["--config.random_encoder=False", f"--config.encoder_weights={weights_file}",
          "--config.model.vit=auto", "--config.model.registers=-1"]


def _converted_dirs(cache):
  return [os.path.join(cache, d) for d in os.listdir(cache) if not d.endswith((".tmp", "-download"))
          and ".tmp-" not in d]


def test_train_resume_export_on_two_processes_with_a_converted_encoder(weights, tmp_path):
  encoder_file, _, root = weights
  caches = [tmp_path / "cache0", tmp_path / "cache1"]
  workdir = tmp_path / "run"
  first = _run(root, workdir, caches, *_pretrained(encoder_file), "--config.train.stop_after=3")
  assert "Stopped after step 3" in first[0]
  # Each host converted the .pth into its own cache, completely, and to the same weights.
  (dir0,), (dir1,) = _converted_dirs(caches[0]), _converted_dirs(caches[1])
  tree0, meta0 = converted.load_params(dir0)
  tree1, meta1 = converted.load_params(dir1)
  assert meta0 == meta1 and (meta0["vit"], meta0["registers"]) == ("small", 4)
  for a, b in zip(*(sorted(_flat(t).items()) for t in (tree0, tree1))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(tree0["encoder"]["register_tokens"],
                                _encoder_state_dict()["register_tokens"].numpy())
  second = _run(None, workdir, caches)  # resumes from step 3 with the saved config
  assert "Resumed from the checkpoint of step 3" in second[0] and "I-AUROC" in second[0]
  assert "I-AUROC" not in second[1]  # one process reports
  # The evaluation due at step 3 (eval_every 3), not run before the stop: the hosts agree to run it first.
  assert [m["step"] for m in main_helpers.metric_lines(workdir) if "eval/I-AUROC" in m] == [3, 6]
  report = json.load(open(workdir / "eval" / "report.json"))
  assert report["step"] == 6 and set(report["classes"]) == {"brick", "nut"}
  _run(None, workdir, caches, "--mode=export")
  info = json.load(open(workdir / "export" / "export_info.json"))
  assert info["step"] == 6 and info["classes"] == ["brick", "nut", "__all__"]


def test_eval_of_a_reference_model_into_a_new_work_directory_on_two_processes(weights, tmp_path):
  _, vitill_file, root = weights
  workdir = tmp_path / "new"
  outs = _run(root, workdir, [tmp_path / "cache0", tmp_path / "cache1"], "--mode=eval",
              *_pretrained(vitill_file))
  assert "I-AUROC" in outs[0] and "I-AUROC" not in outs[1]
  saved = json.load(open(workdir / "config.json"))
  assert saved["encoder_weights"] == str(vitill_file) and saved["model"]["vit"] == "small"
  assert set(json.load(open(workdir / "eval" / "report.json"))["classes"]) == {"brick", "nut"}


def test_four_processes_of_two_devices_train_like_one(weights, tmp_path):
  encoder_file, _, root = weights
  args = [*_pretrained(encoder_file), "--config.train.batch_size=8", "--config.eval.batch_size=8",
          "--config.train.eval_every=0"]  # the final evaluation only
  _run(root, tmp_path / "single", [tmp_path / "cache"], *args, devices=8)
  outs = _run(root, tmp_path / "pod", [tmp_path / f"cache{i}" for i in range(4)], *args, devices=2)
  assert "8 devices" in outs[0]
  one = json.load(open(tmp_path / "single" / "eval" / "report.json"))["classes"]
  four = json.load(open(tmp_path / "pod" / "eval" / "report.json"))["classes"]
  for name in one:
    for key, value in one[name].items():
      # Same global batches and dropout keys on 8 devices; only the order of float sums differs.
      assert four[name][key] == pytest.approx(value, abs=1e-4), (name, key)


def _predictions(out):
  """predictions.csv's rows, each heatmap relative to the output folder."""
  rows = list(csv.DictReader(open(out / prediction_csv.CSV_FILE)))
  for r in rows:
    r["heatmap"] = os.path.relpath(r["heatmap"], out)
  return rows


def test_predict_on_two_processes_writes_the_rows_of_one_and_resumes(weights, tmp_path):
  """Image i is scored by process i mod 2 on its own device; the joined predictions.csv equals one
  process's, in input order. A resumed run (rows lost from the CSV, a killed process's part with a
  torn line) scores only what is missing and duplicates nothing."""
  _, vitill_file, root = weights
  workdir, cache = tmp_path / "reference", tmp_path / "cache0"
  _run(root, workdir, [cache], "--mode=eval", *_pretrained(vitill_file))  # calibration.json
  pattern = f"{root}/*/test/[gs]*/*.png"  # 9 images: 5 on process 0, 4 on process 1
  predict = lambda out: ["--mode=predict", f"--config.predict.input={pattern}",
                         f"--config.predict.output={out}", "--config.eval.batch_size=2"]
  _run(None, workdir, [cache], *predict(tmp_path / "one"))
  one = _predictions(tmp_path / "one")
  assert len(one) == 9
  out = tmp_path / "two"
  outs = _run(None, workdir, [cache, tmp_path / "cache1"], *predict(out))
  assert "9 images: " in outs[0] and "images: " not in outs[1]  # one summary, of every image
  assert "Process 0: Predicted 5 images" in outs[0] and "Process 1: Predicted 4 images" in outs[1]
  two = _predictions(out)
  assert not (out / prediction_csv.PARTS).exists() or not os.listdir(out / prediction_csv.PARTS)

  def assert_same(rows):
    assert [r["image"] for r in rows] == [r["image"] for r in one]
    for a, b in zip(rows, one):
      # Batches of 1 per process against batches of 2: the float sums' order may differ.
      assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-5, abs=1e-7), a["image"]
      others = lambda row: {k: v for k, v in row.items() if "score" not in k}
      assert others(a) == others(b)
      assert os.path.getsize(out / a["heatmap"])

  assert_same(two)
  # A kill: the CSV keeps 3 rows; process 1's part holds the 4th image's row and a torn line.
  with open(out / prediction_csv.CSV_FILE, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=prediction_csv.FIELDS)
    writer.writeheader()
    writer.writerows(dict(r, heatmap=str(out / r["heatmap"])) for r in two[:3])
  os.makedirs(out / prediction_csv.PARTS, exist_ok=True)
  with open(out / prediction_csv.PARTS / "process-00001.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=prediction_csv.FIELDS)
    writer.writeheader()
    writer.writerow(dict(two[3], heatmap=str(out / two[3]["heatmap"])))
    f.write(f"{two[5]['image']},nut,pa")
  shutil.rmtree(out / "nut")  # heatmaps of the lost rows are written again
  outs = _run(None, workdir, [cache, tmp_path / "cache1"], *predict(out))
  assert "Resuming: 4 of 9 images already have a row" in outs[0]
  assert "5 images: " in outs[0]
  assert_same(_predictions(out))
  assert not os.listdir(out / prediction_csv.PARTS)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = np.asarray(v)
  return out
