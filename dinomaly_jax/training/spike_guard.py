"""Loss spikes in training: which losses are spikes, and the record of the rollbacks.

A spike is a non-finite loss, or (spike_factor > 0) a loss above spike_factor x the
median of the last spike_window good losses (judged once the window holds
min(spike_window, 10) losses). With spike_policy "rollback" the train loop restores the
last good checkpoint, continues with the batches after the spike (the ones since that
checkpoint, the offending one among them, are skipped) and multiplies the learning rate
by spike_lr_factor; after spike_max_rollbacks rollbacks, or with policy "stop", it stops
with NonFiniteLossError naming the last good checkpoint.

Each rollback is a line of <workdir>/spike_events.jsonl: a resumed run reads them back to
continue with the same data position and learning rate. Any work directory (local or
gs:// / s3://): the primary process rewrites the whole file atomically (storage.write_shared)
at each rollback (object stores cannot append); every process keeps the same events in memory.
"""
import collections
import dataclasses
import json
import math

import numpy as np

from dinomaly_jax import storage
from dinomaly_jax.errors import NonFiniteLossError

EVENTS_FILE = "spike_events.jsonl"
_MIN_HISTORY = 10


@dataclasses.dataclass(frozen=True)
class Spike:
  step: int  # the step (1-based, as logged) whose loss spiked
  loss: float
  reason: str


class SpikeGuard:
  """Checks fetched losses; records rollbacks (train_config: config.train)."""

  def __init__(self, train_config, workdir: str):
    self.policy = train_config.spike_policy
    self.factor = float(train_config.spike_factor)
    self.lr_factor = float(train_config.spike_lr_factor)
    self.max_rollbacks = int(train_config.spike_max_rollbacks)
    self._path = storage.join(workdir, EVENTS_FILE)
    self._recent = collections.deque(maxlen=int(train_config.spike_window))
    self.events = []
    if storage.exists(self._path):
      self.events = [json.loads(line) for line in storage.read_text(self._path).splitlines() if line.strip()]

  @property
  def lr_scale(self) -> float:
    """The factor on the configured learning rate after the recorded rollbacks: the last
    event's, as recorded (spike_lr_factor may have changed since; it applies to new rollbacks)."""
    return float(self.events[-1]["lr_scale"]) if self.events else 1.0

  @property
  def data_offset(self) -> int:
    """Batches skipped so far: the data position of step s is s + data_offset."""
    return sum(e["skipped_batches"] for e in self.events)

  def check(self, losses: list[tuple[int, float]]) -> Spike | None:
    """The first spike among (step, loss) pairs in step order; good losses join the median."""
    for step, loss in losses:
      if not math.isfinite(loss):
        return Spike(step, loss, "non-finite loss")
      if self.factor and len(self._recent) >= min(self._recent.maxlen, _MIN_HISTORY):
        median = float(np.median(self._recent))
        if loss > self.factor * median:
          return Spike(step, loss, f"loss over {self.factor:g} x the running median {median:.4g}")
      self._recent.append(loss)
    return None

  def record(self, spike: Spike, *, last_good: int, done: int) -> dict:
    """Records a rollback from step `done` to the checkpoint `last_good`, or raises.

    Raises NonFiniteLossError with policy "stop" or when the rollbacks are used up.
    """
    if self.policy == "stop" or len(self.events) >= self.max_rollbacks:
      why = ("training stopped" if self.policy == "stop" else
             f"training stopped after {len(self.events)} rollbacks (config.train.spike_max_rollbacks)")
      raise NonFiniteLossError(
          f"The loss is {spike.loss} at step {spike.step} ({spike.reason}): {why}. The last good "
          f"checkpoint is step {last_good}; lower config.train.lr or check the data.")
    event = {"step": spike.step, "loss": spike.loss if math.isfinite(spike.loss) else str(spike.loss),
             "reason": spike.reason, "rolled_back_to": last_good, "skipped_batches": done - last_good,
             "lr_scale": self.lr_scale * self.lr_factor}
    self.events.append(event)
    storage.write_shared(self._path, "".join(json.dumps(e) + "\n" for e in self.events))
    return event
