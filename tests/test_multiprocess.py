"""Two JAX processes on this machine (CPU, local coordinator) train and evaluate like one."""
import json
import os
import subprocess
import sys

import portpicker
import pytest

from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(root, workdir, extra_env=None):
  cmd = [sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{root}",
         f"--workdir={workdir}", "--config.train.eval_every=0"]  # the final evaluation only
  # (an evaluation between steps on 2 processes: tests/test_pod_modes.py, at the resumed step)
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(extra_env or {}))
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc):
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out
  return out


def test_two_processes_match_one(tmp_path):
  root = main_helpers.tiny_dataset(tmp_path / "data")
  single = _finish(_main(root, tmp_path / "single"))
  port = portpicker.pick_unused_port()
  procs = [_main(root, tmp_path / "multi", {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  outs = [_finish(p) for p in procs]
  assert "2 devices" in outs[0] and "I-AUROC" in outs[0]  # process 0 reports
  assert "I-AUROC" not in outs[1]  # only process 0 writes reports
  assert "I-AUROC" in single
  one = json.load(open(tmp_path / "single" / "eval" / "report.json"))["classes"]
  two = json.load(open(tmp_path / "multi" / "eval" / "report.json"))["classes"]
  assert set(one) == set(two) == {"brick", "nut"}
  for name in one:
    for key, value in one[name].items():
      # Same global batches and dropout keys; only the order of float reductions differs.
      assert two[name][key] == pytest.approx(value, abs=1e-4), (name, key)
