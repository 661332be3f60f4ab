"""Dinomaly2, few-shot and MVTec AD 2 through the command line, at tiny sizes on generated data:
train/eval end to end, a converted Dinomaly2-format checkpoint, the evaluation-server files,
bad input as one line."""
import csv
import functools
import json
import os

from dinov2.layers.block import Block as TorchDinoBlock
from dinov2.models import vision_transformer as dinov2_vit
import numpy as np
from PIL import Image
import pytest
import tifffile
import torch

from dinomaly_jax.data import few_shot
from dinomaly_jax.data import synthetic
from dinomaly_jax.data.records import Record
from tests import main_helpers
from tests.test_command_line import _main
from tests.test_command_line import _one_error_line

# ViT-S/14 with random weights at 28 x 28 (2 x 2 patches), its first 4 blocks and 4 decoder
# blocks (tests/small_config.py): a few training steps.
TINY = [
        "--config.random_encoder=True", "--config.data.crop=28", "--config.data.resize=32",
        "--config.data.workers=0", "--config.train.steps=4", "--config.train.batch_size=4",
        "--config.train.warmup_steps=2", "--config.train.loss_p_steps=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=4", "--config.eval.batch_size=8",
        "--config.eval.pictures_per_class=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))


def _report(workdir):
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    return json.load(f)


def test_mvtec_method_dinomaly2_end_to_end(data_root, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _main("--config=tests/small_config.py:mvtec;method=dinomaly2,encoder=dinov2_vits14_reg4",
               f"--workdir={workdir}", f"--config.data.root={data_root}", *TINY)
  assert proc.returncode == 0, proc.stdout
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert (saved["model"]["context_recentering"], saved["model"]["bottleneck_down_dim"],
          saved["train"]["lr_schedule"], saved["train"]["bottleneck_first_lr"]) == (
              True, 256, "warmup_constant", 2e-4)
  assert set(_report(workdir)["classes"]) == {"brick", "nut"}
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  lrs = {m["step"]: m["lr"] for m in logged if "lr" in m}
  assert lrs[2] == pytest.approx(2e-3 * 1 / 2) and lrs[4] == pytest.approx(2e-3)  # warm-up, then constant


def test_shots_end_to_end_recorded_and_reused(data_root, tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=tests/small_config.py:mvtec;method=dinomaly2,encoder=dinov2_vits14_reg4,shots=4",
          f"--workdir={workdir}",
          f"--config.data.root={data_root}", *TINY]
  proc = _main(*args)
  assert proc.returncode == 0, proc.stdout
  assert "on 8 images of 2 classes" in proc.stdout  # 4 of each class's 8 training images
  data = json.load(open(os.path.join(workdir, "config.json")))["data"]
  assert (data["shots"], data["augment"]) == (4, True)  # Dinomaly2 few-shot trains on augmented images
  saved = json.load(open(os.path.join(workdir, few_shot.SHOTS_FILE)))
  assert saved["shots"] == 4 and sorted(saved["classes"]) == ["brick", "nut"]
  for name, paths in saved["classes"].items():
    assert len(set(paths)) == 4 and all(f"/{name}/train/good/" in p for p in paths)
  records = [Record(os.path.join(data_root, n, "train", "good", f"{i:03d}.png"), n, 0, "good", None)
             for n in ("brick", "nut") for i in range(8)]
  assert few_shot.draw(records, 4, 0) == saved["classes"]  # the same seed draws the same files
  assert few_shot.draw(records, 4, 1) != saved["classes"]
  # A run that continues there reads the recorded choice back, whatever the seed draws now.
  assert {r.image_path for r in few_shot.select(records, 4, 1, workdir)} == {
      p for paths in saved["classes"].values() for p in paths}
  line = _one_error_line(_main(*args[:1], f"--workdir={tmp_path / 'other'}",
                               f"--config.data.root={data_root}", *TINY, "--config.data.shots=9"))
  assert "config.data.shots=9: class 'brick' has only 8 training images" in line


@functools.cache
def _dinomaly2_checkpoint(folder):
  """A Dinomaly2-format state dict (official ViT-S/14 encoder, two-part bottleneck, 4 decoder
  blocks), random weights, saved as the reference saves model.state_dict()."""
  torch.manual_seed(0)
  dim = 384
  encoder = dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
  bottleneck = torch.nn.ModuleList([
      torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.Dropout(0.4)),
      torch.nn.Sequential(torch.nn.Linear(256, 4 * dim), torch.nn.GELU(), torch.nn.Dropout(0.4),
                          torch.nn.Linear(4 * dim, dim), torch.nn.Dropout(0.4))])
  decoder = torch.nn.ModuleList([TorchDinoBlock(dim, 6, qkv_bias=True,
                                                norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-8))
                                 for _ in range(4)])
  state = {}
  for prefix, module in (("encoder", encoder), ("bottleneck", bottleneck), ("decoder", decoder)):
    state.update({f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()})
  path = os.path.join(folder, "dinomaly2_model.pth")
  torch.save(state, path)
  return path


def test_converted_dinomaly2_checkpoint_evaluates(data_root, tmp_path):
  import subprocess
  import sys
  pth = _dinomaly2_checkpoint(str(tmp_path))
  out = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "weight_conversion.convert", "--checkpoint", pth,
                         "--out", str(out)], cwd=main_helpers_repo(), text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  assert proc.returncode == 0, proc.stdout
  meta = json.load(open(out / "meta.json"))
  assert (meta["source_format"], meta["bottleneck_down_dim"], meta["vit"]) == ("dinomaly2", 256, "small")
  common = [f"--config.data.root={data_root}", f"--config.encoder_weights={out}", "--mode=eval",
            "--config.data.crop=28", "--config.data.resize=32", "--config.data.workers=0",
            "--config.eval.batch_size=8", "--config.eval.pictures_per_class=0"]
  line = _one_error_line(_main("--config=tests/small_config.py:folder;", f"--workdir={tmp_path / 'plain'}", *common))
  assert "is a trained Dinomaly2 checkpoint" in line and "method=dinomaly2" in line
  workdir = tmp_path / "eval"
  proc = _main("--config=tests/small_config.py:folder;method=dinomaly2", f"--workdir={workdir}", *common)
  assert proc.returncode == 0, proc.stdout
  report = _report(str(workdir))
  assert set(report["classes"]) == {"brick", "nut"}
  assert all(np.isfinite(v) for c in report["classes"].values() for v in c.values())


def main_helpers_repo():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory):
  return synthetic.generate_mvtec_ad2(str(tmp_path_factory.mktemp("ad2")), classes=("brick", "nut"))


def test_mvtec_ad2_end_to_end_and_submission_files(ad2_root, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _main("--config=tests/small_config.py:mvtec_ad2;encoder=dinov2_vits14_reg4", f"--workdir={workdir}",
               f"--config.data.root={ad2_root}", *TINY)
  assert proc.returncode == 0, proc.stdout
  assert "on 16 images of 2 classes" in proc.stdout  # train/good only; validation/good calibrates
  report = _report(workdir)
  assert set(report["classes"]) == {"brick", "nut"}
  inspection = report["inspection"]["nut"]
  assert inspection["normal_test_images"] == 3 and inspection["anomalous_test_images"] == 3
  calibration = json.load(open(os.path.join(workdir, "calibration.json")))
  assert calibration["nut"]["num_images"] == 3  # the 3 validation/good images
  proc = _main(f"--workdir={workdir}", "--mode=submit")
  assert proc.returncode == 0, proc.stdout
  out = os.path.join(workdir, "submission")
  for name in ("brick", "nut"):
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
      maps = sorted(os.listdir(os.path.join(out, "anomaly_images", name, split)))
      masks = sorted(os.listdir(os.path.join(out, "anomaly_images_thresholded", name, split)))
      assert maps == [f"00{i}_{suffix}.tiff" for i in range(2)]
      assert masks == [f"00{i}_{suffix}.png" for i in range(2)]
      amap = tifffile.imread(os.path.join(out, "anomaly_images", name, split, maps[0]))
      assert amap.dtype == np.float16 and amap.shape == (64, 64)  # the image's own size
      mask = np.asarray(Image.open(os.path.join(out, "anomaly_images_thresholded", name, split, masks[0])))
      assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
  rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
  assert len(rows) == 8 and {r["decision"] for r in rows} <= {"normal", "anomalous"}


def test_mvtec_ad2_bad_input_is_one_line(ad2_root, tmp_path):
  import shutil
  root = tmp_path / "ad2"
  shutil.copytree(ad2_root, root)
  args = ["--config=tests/small_config.py:mvtec_ad2;encoder=dinov2_vits14_reg4", f"--workdir={tmp_path / 'w'}",
          f"--config.data.root={root}", *TINY]
  mask = root / "nut" / "test_public" / "ground_truth" / "bad" / "001_bad_mask.png"
  os.remove(mask)
  line = _one_error_line(_main(*args))
  assert line == (f"error: {root / 'nut' / 'test_public' / 'bad' / '001_bad.png'}: defective image "
                  f"without a mask; expected {mask}.")
  shutil.copy(root / "nut" / "test_public" / "ground_truth" / "bad" / "000_bad_mask.png", mask)
  os.rename(root / "brick" / "test_private", root / "brick" / "test_privat")
  line = _one_error_line(_main(*args))
  assert line.startswith(f"error: {root / 'brick' / 'test_privat'}: unknown split folder; an MVTec AD 2 "
                         "class holds only train, validation, test_public, test_private, test_private_mixed")
  line = _one_error_line(_main(*args, "--config.predict.submission_splits=('test_secret',)"))
  assert "config.predict.submission_splits must be some of ['test_private', 'test_private_mixed']" in line
  assert not os.path.exists(tmp_path / "w")
