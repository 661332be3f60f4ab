"""Pod checks: launch-environment detection, checks before step 0, encoder identity, file layer."""
import os
import subprocess
import sys

import jax
from jax._src.clusters import slurm_cluster
import numpy as np
import pytest

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.errors import IncompatibleWorkdirError
from dinomaly_jax.training import preflight
from dinomaly_jax.weights import checkpoint
from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.fixture
def clean_env(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
      monkeypatch.delenv(k)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  return calls


def test_slurm_task_starts_auto_detected_distributed_jax(clean_env, monkeypatch):
  for k, v in SLURM_TASK.items():
    monkeypatch.setenv(k, v)
  assert sharding.maybe_initialize_distributed()
  assert clean_env == [((), {})]  # jax.distributed.initialize() reads the cluster itself
  # ... and what jax reads from these variables (the README's SLURM recipe relies on it):
  cluster = slurm_cluster.SlurmCluster
  assert cluster.is_env_present()
  assert cluster.get_coordinator_address(None, None) == f"node003:{4242 % 4096 + 61440}"
  assert (cluster.get_process_count(), cluster.get_process_id()) == (2, 1)


@pytest.mark.parametrize("env, several", [
    ({"SLURM_NTASKS": "1"}, False),  # a single task (e.g. an interactive srun)
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),  # a Cloud TPU VM slice, --worker=all
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
])
def test_environment_detection(clean_env, monkeypatch, env, several):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert sharding.maybe_initialize_distributed() == several
  assert len(clean_env) == several


def test_explicit_coordinator_needs_all_three_variables(clean_env, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
    sharding.maybe_initialize_distributed()
  assert not clean_env


@pytest.mark.parametrize("batch, processes, devices, ok", [
    (16, 2, 4, True), (16, 4, 4, True), (12, 2, 4, False), (6, 4, 1, False), (3, 1, 1, True)])
def test_batches_must_split_over_processes_and_devices(batch, processes, devices, ok):
  config = base_config()
  config.train.batch_size = batch
  if ok:
    sharding.check_batch("train.batch_size", config.train.batch_size, processes, devices)
  else:
    with pytest.raises(ConfigError, match=rf"config.train.batch_size={batch} must be a multiple of "
                                          rf"{processes * devices} \({processes} processes x {devices}"):
      sharding.check_batch("train.batch_size", config.train.batch_size, processes, devices)


def test_eval_batch_is_checked_before_step_0_from_the_command_line(tmp_path):
  root = main_helpers.tiny_dataset(tmp_path / "data")
  proc = subprocess.run(
      [sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{root}",
       f"--workdir={tmp_path / 'run'}", "--config.eval.batch_size=3", "--config.train.batch_size=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.eval.batch_size=3 must be a multiple of 2 (1 processes x 2 devices per "
      "process) so that every device gets the same number of images; use e.g. 2.")
  assert "Traceback" not in proc.stderr and "train:" not in proc.stderr  # before step 0
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_feature_cache_memory_is_checked_per_host():
  config = main_helpers.tiny_config("/unused")  # ViT-S/4 registers, 56 px: 4x4 patches, 384 dims
  config.data.cache_features = True
  config.data.cache_dtype = "float32"
  # Per image: (1 + 4 + 16) x 384 bottleneck input + 2 groups x 16 x 384 = 20,352 floats = 81,408 bytes.
  # 1,000 images, batch 4: 1,000 rows on one host (0.076 GiB), 500 on each of two.
  per_row = 81_408
  preflight.check_cache_memory(config, 1000, 2, available=int(500 * per_row / 0.8) + 1)
  with pytest.raises(ConfigError, match=r"config.data.cache_features: the cache needs 0.08 GiB per "
                                        r"process \(1,000 of 1,000 images in float32\)"):
    preflight.check_cache_memory(config, 1000, 1, available=int(500 * per_row / 0.8) + 1)


def test_resuming_with_other_encoder_weights_names_both(tmp_path):
  rng = np.random.default_rng(0)
  params = {"blocks_0": {"w": rng.normal(size=(3, 4)).astype(np.float32)}}
  other = {"blocks_0": {"w": params["blocks_0"]["w"] + np.float32(1e-6)}}
  fingerprint = checkpoint.encoder_fingerprint(params)
  assert fingerprint == checkpoint.encoder_fingerprint({"blocks_0": {"w": params["blocks_0"]["w"].copy()}})
  assert fingerprint != checkpoint.encoder_fingerprint(other)
  workdir = str(tmp_path)
  checkpoint.check_encoder(workdir, fingerprint, "weights/a")  # nothing recorded yet: accepted
  checkpoint.save_encoder(workdir, fingerprint, "weights/a")
  checkpoint.check_encoder(workdir, "other", "weights/b")  # no checkpoint yet: a new start is free
  os.makedirs(tmp_path / checkpoint.CHECKPOINT_DIR / "3")  # a finished checkpoint of step 3
  checkpoint.check_encoder(workdir, fingerprint, "/moved/weights/a")  # same weights, new path
  with pytest.raises(IncompatibleWorkdirError, match=(
      rf"trained with the encoder weights/a \(fingerprint {fingerprint}\), but this run loads "
      rf"weights/b \(fingerprint {checkpoint.encoder_fingerprint(other)}\)")):
    checkpoint.check_encoder(workdir, checkpoint.encoder_fingerprint(other), "weights/b")


def test_atomic_writes_leave_no_partial_file(tmp_path):
  path = str(tmp_path / "sub" / "config.json")
  storage.write_text(path, "old")
  storage.write_text(path, "new")
  assert storage.read_text(path) == "new"
  assert sorted(os.listdir(tmp_path / "sub")) == ["config.json"]  # the temporary file was renamed
  assert storage.join("gs://b/run", "eval", "report.json") == "gs://b/run/eval/report.json"
  assert storage.absolute("gs://b/run") == "gs://b/run"
  assert storage.absolute("run") == os.path.join(os.getcwd(), "run")
