"""Loss spikes: detection (pure), and a NaN batch in a real run rolled back and survived."""
import json
import math

import jax
import numpy as np
import pytest

from dinomaly_jax import run
from dinomaly_jax import sharding
from dinomaly_jax.config import defaults
from dinomaly_jax.data import pipeline
from dinomaly_jax.errors import NonFiniteLossError
from dinomaly_jax.training import model_state
from dinomaly_jax.training import optim
from dinomaly_jax.training import spike_guard
from tests import main_helpers


def _guard(tmp_path, **train):
  c = defaults.base_config().train
  c.update(train)
  return spike_guard.SpikeGuard(c, str(tmp_path))


def test_nonfinite_and_exploding_losses_are_spikes(tmp_path):
  guard = _guard(tmp_path, spike_factor=10.0, spike_window=20)
  assert guard.check([(s, 1.0 - 0.01 * s) for s in range(1, 10)]) is None  # 9 losses: no judging yet
  assert guard.check([(10, 50.0)]) is None  # too few losses for a median: not judged
  spike = guard.check([(11, 0.5), (12, 20.0), (13, math.nan)])
  assert (spike.step, spike.loss) == (12, 20.0) and "running median" in spike.reason
  assert guard.check([(14, 9.0)]) is None  # 9 < 10 x median
  assert guard.check([(15, math.inf)]).reason == "non-finite loss"
  assert _guard(tmp_path, spike_factor=0.0).check([(s, 1e6 * s) for s in range(1, 30)]) is None


def test_rollbacks_are_recorded_and_limited(tmp_path):
  guard = _guard(tmp_path, spike_max_rollbacks=2, spike_lr_factor=0.5)
  spike = spike_guard.Spike(7, math.nan, "non-finite loss")
  guard.record(spike, last_good=5, done=8)
  guard.record(spike, last_good=5, done=6)
  assert (guard.lr_scale, guard.data_offset) == (0.25, 4)
  with pytest.raises(NonFiniteLossError, match="after 2 rollbacks.*last good checkpoint is step 5"):
    guard.record(spike, last_good=5, done=8)
  again = _guard(tmp_path, spike_max_rollbacks=2, spike_lr_factor=0.5)  # a resumed run reads them
  assert (again.lr_scale, again.data_offset, len(again.events)) == (0.25, 4, 2)
  # spike_lr_factor may change between runs: the recorded events keep the scale they reached
  # (0.1 ** 2 = 0.01 when recomputed from the new factor); the new factor applies to new rollbacks.
  changed = _guard(tmp_path, spike_max_rollbacks=3, spike_lr_factor=0.1)
  assert changed.lr_scale == 0.25
  assert changed.record(spike, last_good=5, done=6)["lr_scale"] == pytest.approx(0.025)
  assert _guard(tmp_path, spike_lr_factor=0.5).lr_scale == pytest.approx(0.025)
  with pytest.raises(NonFiniteLossError, match="nan at step 7.*training stopped"):
    _guard(tmp_path / "other", spike_policy="stop").record(spike, last_good=0, done=8)


def test_a_nan_batch_is_rolled_back_and_training_finishes(data_root, tmp_path, monkeypatch):
  real = pipeline.train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    for position, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      if position == 4:  # the batch of step 5
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(pipeline, "train_iterator", poisoned)
  # Log every 2, checkpoint every 3; stop_after ends at step 8 without the final evaluation.
  config = main_helpers.tiny_config(data_root, steps=9, stop_after=8, eval_every=0)
  run.run(config, str(tmp_path))
  with open(tmp_path / spike_guard.EVENTS_FILE) as f:
    events = [json.loads(line) for line in f]
  # NaN at step 5, seen at the log of step 6: back to checkpoint 3, batches 4-6 skipped.
  assert events == [{"step": 5, "loss": "nan", "reason": "non-finite loss", "rolled_back_to": 3,
                     "skipped_batches": 3, "lr_scale": 0.5}]
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert any(m.get("spike/rollbacks") == 1 and m["step"] == 5 for m in logged)
  after = [m for m in logged if "loss" in m][-1]  # the last logged step (8), after the rollback
  assert after["step"] == 8 and math.isfinite(after["loss"])
  schedule = optim.make_schedule(config.train)
  assert after["lr"] == pytest.approx(0.5 * float(schedule(7)), rel=1e-6)
  _, state = model_state.load_trained(config, str(tmp_path), sharding.make_mesh())
  assert int(state.step) == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))
