"""Signals during training: a signal in the last step stops the run (not swallowed by the
evaluation that follows), and a SIGINT on one of two processes stops both at the same step,
within a few steps, not at the next logging step."""
import os
import re
import signal
import subprocess
import sys

import portpicker
import pytest

from dinomaly_jax import run
from dinomaly_jax.errors import Interrupted
from dinomaly_jax.training import train_step
from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))


def test_signal_in_the_last_step_stops_before_the_evaluation(data_root, tmp_path, monkeypatch):
  make = train_step.make_train_step
  calls = []

  def interrupted_in_the_last_step(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def wrapped(state, batch):
      calls.append(1)
      if len(calls) == 4:  # the 4th and last step
        os.kill(os.getpid(), signal.SIGINT)
      return step_fn(state, batch)
    return wrapped

  monkeypatch.setattr(train_step, "make_train_step", interrupted_in_the_last_step)
  config = main_helpers.tiny_config(data_root, steps=4, eval_every=0)
  with pytest.raises(Interrupted, match="SIGINT: stopped after step 4; its checkpoint is saved") as e:
    run.run(config, str(tmp_path))
  assert e.value.exit_code == 128 + signal.SIGINT
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]  # checkpoint_every=3, and the last step
  assert not os.path.exists(tmp_path / "eval" / "report.json")  # stopped before evaluating
  result = run.run(config, str(tmp_path))  # resuming evaluates
  assert set(result["classes"]) == {"brick", "nut"}


def test_sigint_on_one_of_two_processes_stops_both_at_the_same_step(data_root, tmp_path):
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dinomaly_jax.main", f"--config=tests/tiny_config.py:{data_root}",
         f"--workdir={tmp_path}", "--config.data.workers=0", "--config.train.steps=1000",
         "--config.train.log_every=500", "--config.train.eval_every=0", "--config.train.checkpoint_every=0"],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  seen = ""
  while "3/1000" not in seen:  # process 0's progress bar: a few steps done
    char = procs[0].stdout.read(1)
    assert char, seen
    seen += char
  procs[1].send_signal(signal.SIGINT)  # the process without the progress bar
  outs = [seen + procs[0].communicate(timeout=300)[0], procs[1].communicate(timeout=300)[0]]
  stopped = [re.search(r"(SIGINT|SIGTERM): stopped after step (\d+); its checkpoint is saved", o) for o in outs]
  assert all(stopped), outs
  assert stopped[1][1] == "SIGINT" and procs[1].returncode == 128 + signal.SIGINT, outs[1]
  assert procs[0].returncode == 128 + signal.Signals[stopped[0][1]], outs[0]
  step = int(stopped[0][2])
  assert int(stopped[1][2]) == step
  assert 3 <= step < 500  # agreed through the preemption notice, not at the logging step (500)
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]
  assert "Traceback" not in outs[0] + outs[1]
