"""Nothing lost, tested by breaking it: training killed with SIGKILL at random steps (twice
inside a checkpoint write) and resumed; an object store that fails a share of its requests;
a full disk. Every run is the real command line in a subprocess.

The runs of a test share a JAX compilation cache (a folder of the test's), so only the
first one compiles.
"""
import contextlib
import csv
import glob
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import gcsfs
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dinomaly_jax import storage
from tests import faulty_proxy
from tests import main_helpers
from tests import object_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax writes step N in "N.orbax-checkpoint-tmp", then renames it


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(jax_cache, **extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              **extra)


def _train_command(data_root, workdir, *flags):
  return [sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{data_root},shallow",
          f"--workdir={workdir}", "--config.data.workers=0", *flags]


def _start(cmd, env, **kwargs):
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def _finish(proc, ok=True):
  out, _ = proc.communicate(timeout=600)
  assert (proc.returncode == 0) == ok, out
  return out


def _checkpoint(workdir, step):
  """The trainable state saved at `step` (step, params, opt_state, rng), as numpy arrays."""
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def _clients(env):
  """This process's object-store clients pointed by `env` (gcsfs instances made afresh)."""
  with object_store.environment(env):
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
      yield
    finally:
      gcsfs.GCSFileSystem.clear_instance_cache()


def _wait_for(folder, name_fn, proc, timeout=300):
  """Polls `folder` every 2 ms until name_fn(names) is true; the names then."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if name_fn(names):
      return names
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.002)
  raise AssertionError(f"timed out waiting in {folder}")


STEPS = 8
TRAIN_FLAGS = (f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1", "--config.train.log_every=1",
               "--config.train.eval_every=0")


def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_run(data_root, jax_cache, tmp_path):
  """Three SIGKILLs at seeded random steps, two of them inside the write of a checkpoint (the
  step's orbax temporary folder is there: killed before its rename), one between writes; each
  run resumes. The final parameters, optimizer state and RNG are bit-identical to an
  uninterrupted run's (same seed, same data order, same compiled step: exact equality), and
  metrics.jsonl holds each step once, with the same values."""
  env = _env(jax_cache)
  straight = tmp_path / "straight"
  _finish(_start(_train_command(data_root, straight, *TRAIN_FLAGS), env))

  killed = tmp_path / "killed"
  folder = killed / "checkpoints"
  rng = random.Random(23)
  latest = 0
  for inside_write in (True, False, True):
    proc = _start(_train_command(data_root, killed, *TRAIN_FLAGS), env)
    step = rng.randint(latest + 1, latest + 2)  # 3 kills end before step 8
    if inside_write:  # SIGKILL as soon as the step's temporary folder appears
      _wait_for(folder, lambda names: f"{step}{ORBAX_TMP}" in names, proc)
      proc.send_signal(signal.SIGKILL)
    else:  # SIGKILL at a random moment after the checkpoint of `step` (while training on)
      _wait_for(folder, lambda names: str(step) in names, proc)
      time.sleep(rng.uniform(0, 0.5))
      proc.send_signal(signal.SIGKILL)
    out = _finish(proc, ok=False)
    assert proc.returncode == -signal.SIGKILL, out
    if latest:
      assert f"Resumed from the checkpoint of step {latest} in {killed}." in out
    names = os.listdir(folder)
    if inside_write:  # the kill landed inside the write: a half-written step, not renamed
      assert f"{step}{ORBAX_TMP}" in names and str(step) not in names, names
    latest = max(int(n) for n in names if n.isdigit())
  out = _finish(_start(_train_command(data_root, killed, *TRAIN_FLAGS), env))
  assert f"Resumed from the checkpoint of step {latest} in {killed}." in out
  assert "I-AUROC" in out  # the final evaluation ran

  assert not [n for n in os.listdir(folder) if ORBAX_TMP in n]  # half-written steps cleaned up
  assert sorted(os.listdir(folder)) == sorted(os.listdir(straight / "checkpoints"))
  want, got = _checkpoint(straight, STEPS), _checkpoint(killed, STEPS)
  assert want.keys() == got.keys() and int(got["['step']"]) == STEPS
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Each step's metrics once, the same values (each from the run that trained the kept step).
  assert main_helpers.metric_lines(killed) == main_helpers.metric_lines(straight)
  with open(straight / "eval" / "report.json") as f, open(killed / "eval" / "report.json") as g:
    assert json.load(f)["mean"] == json.load(g)["mean"]


def test_train_evaluate_predict_through_a_faulty_object_store(data_root, jax_cache, tmp_path):
  """The work directory and predict's output on the GCS emulator, behind a proxy that fails
  a seeded 15% of the requests (500/503 replies, connections dropped before the request or
  after it was carried out, replies delayed 0.5 s): the clients' retries (gcsfs, tensorstore)
  carry training, its evaluation and predict through; every checkpoint restores, each step's
  metrics are there once, predictions.csv has one row per image."""
  workdir = f"gs://{object_store.BUCKET}/faulty"
  with object_store.gcs_emulator() as direct, faulty_proxy.FaultyProxy(
      direct["STORAGE_EMULATOR_HOST"], share=0.15, seed=5, slow_s=0.5) as proxy:
    env = _env(jax_cache, **object_store.client_env(proxy.url))
    train = _finish(_start(_train_command(
        data_root, workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2",
        "--config.train.log_every=2", "--config.train.eval_every=0"), env))
    trained_with = dict(proxy.faults)
    images = sorted(glob.glob(os.path.join(data_root, "*", "test", "*", "*.png")))
    predict = _finish(_start([sys.executable, "-m", "dinomaly_jax.main", f"--workdir={workdir}", "--mode=predict",
                              f"--config.predict.input={data_root}/*/test/*/*.png"], env))
    predicted_with = dict(proxy.faults)
    with _clients(direct):  # read back past the proxy
      assert all(trained_with.get(kind, 0) >= 2 for kind in faulty_proxy.KINDS), trained_with
      assert all(predicted_with[kind] > trained_with[kind] for kind in faulty_proxy.KINDS), predicted_with
      assert "I-AUROC" in train and "Traceback" not in train + predict
      assert storage.listdir(f"{workdir}/checkpoints") == ["2", "4"]
      for step in (2, 4):
        state = ocp.PyTreeCheckpointer().restore(f"{workdir}/checkpoints/{step}/default")
        assert int(state["step"]) == step
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
      metrics = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
      assert [(m["step"], "loss" in m) for m in metrics] == [(2, True), (4, True), (4, False)]  # 4: eval/
      report = json.loads(storage.read_text(f"{workdir}/eval/report.json"))
      assert report["step"] == 4 and set(report["classes"]) == {"brick", "nut"}
      assert set(json.loads(storage.read_text(f"{workdir}/calibration.json"))) >= {"brick", "nut"}
      rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{workdir}/predictions/predictions.csv"))))
      assert sorted(r["image"] for r in rows) == images  # each image once
      assert all(r["decision"] in ("normal", "anomalous") and not r["error"] for r in rows)
      assert len({r["heatmap"] for r in rows}) == len(rows) and all(storage.exists(r["heatmap"]) for r in rows)
      assert "predictions.csv.parts" not in storage.listdir(f"{workdir}/predictions")  # joined, removed


def test_an_object_store_that_keeps_failing_stops_with_one_line(jax_cache):
  """Every request answered 500: gcsfs's retries (6 tries per request, backoff up to 16 s) run
  out, and the command line says so in one line (no traceback, gcsfs's own log of it hidden)."""
  with object_store.gcs_emulator() as direct, faulty_proxy.FaultyProxy(
      direct["STORAGE_EMULATOR_HOST"], share=1.0, seed=0, kinds=("error",)) as proxy:
    proc = _start([sys.executable, "-m", "dinomaly_jax.main", f"--workdir=gs://{object_store.BUCKET}/down",
                   "--mode=eval"], _env(jax_cache, **object_store.client_env(proxy.url)))
    out = _finish(proc, ok=False)
  assert out.strip() == ("error: the object store failed after its client's retries: HttpError: "
                         "injected by the faulty proxy, 500."), out
  assert proxy.faults["error"] >= 6  # tried again before giving up


def test_a_delete_whose_reply_is_lost_is_done():
  """The store deletes the object but the reply is lost: gcsfs retries, is told 404, and
  storage.remove takes that as done (it raised FileNotFoundError, failing predict's last step)."""
  with object_store.gcs_emulator() as direct, faulty_proxy.FaultyProxy(
      direct["STORAGE_EMULATOR_HOST"], share=1.0, seed=0, kinds=("lost_reply",), methods=("DELETE",),
      max_faults=1) as proxy, _clients(object_store.client_env(proxy.url)):
    path = f"gs://{object_store.BUCKET}/part-000000.csv"
    storage.write_text(path, "image\n")
    storage.remove(path)
    assert proxy.faults == {"lost_reply": 1} and not storage.exists(path)


def _mount_tmpfs(folder, size: str) -> bool:
  """A small tmpfs at `folder` (root with CAP_SYS_ADMIN, as CI runs); False where not allowed."""
  os.makedirs(folder)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                        capture_output=True, check=False).returncode == 0


def _file_size_limit(limit: int):
  """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
  def set_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return set_limit


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(data_root, jax_cache, tmp_path):
  """A run checkpoints step 2 and stops. Resumed on a full disk (a 200 MiB tmpfs with 30 MiB
  left: needs root; a checkpoint is 72 MiB), it stops before writing the checkpoint of step 4,
  with one line naming the folder; resumed under a file-size limit of 8 MiB (RLIMIT_FSIZE: any
  user; orbax's files are larger), the checkpoint write fails half-way and the run ends with a
  line naming the file, and no traceback (tensorstore's callbacks into orbax's closed event loop
  are dropped). The checkpoint of step 2 stays intact: with the space back, the run resumes from
  it and finishes."""
  disk = tmp_path / "disk"
  tmpfs = _mount_tmpfs(disk, "200m")
  try:
    workdir = disk / "run"
    env = _env(jax_cache)
    command = _train_command(data_root, workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2",
                             "--config.train.eval_every=0")
    _finish(_start(command + ["--config.train.stop_after=2"], env))
    if tmpfs:
      ballast = disk / "ballast"
      with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - (30 << 20))
      out = _finish(_start(command, env), ok=False)
      last = out.strip().splitlines()[-1]
      assert re.fullmatch(
          rf"error: {workdir}/checkpoints: the disk is full: a checkpoint needs 72 MiB, 30 MiB are free; "
          rf"the checkpoint of step 2 is intact\. Free some space and run again to resume: "
          rf"python -m dinomaly_jax\.main --workdir={workdir}", last), out
      assert "Traceback" not in out and out.count("error") == 1, out
      assert os.listdir(workdir / "checkpoints") == ["2"]
      os.remove(ballast)
    limited = _start(command, env, preexec_fn=_file_size_limit(8 << 20))
    out = _finish(limited, ok=False)
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in out and "Event loop is closed" not in out, out
    assert re.fullmatch(rf"error: {workdir}/checkpoints/4{ORBAX_TMP}/\S+: the file outgrew this process's "
                        rf"file-size limit \(ulimit -f\)\. The last finished checkpoint is intact; free some "
                        rf"space\. Resume with: python -m dinomaly_jax\.main --workdir={workdir}", errors[0]), out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", f"4{ORBAX_TMP}"]
    out = _finish(_start(command, env))
    assert f"Resumed from the checkpoint of step 2 in {workdir}." in out and "I-AUROC" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert [m["step"] for m in main_helpers.metric_lines(workdir)] == [2, 4, 4]  # log_every 2; 4: eval/
    if not tmpfs:  # seen in the report, not passed over
      pytest.skip("the full-disk half needs to mount a tmpfs (root with CAP_SYS_ADMIN, as CI runs); "
                  "the file-size-limit half passed")
  finally:
    if tmpfs:
      subprocess.run(["umount", str(disk)], check=True)
