"""Stopping training on SIGINT or SIGTERM at a step that every process agrees on.

While a `StopOnSignal` is active, the first SIGINT (Ctrl-C) or SIGTERM (preemptible VMs,
Kubernetes pods) only sets a flag; the train loop finishes its step, saves a checkpoint
and stops. A second signal stops at once (KeyboardInterrupt).

On several processes every one must stop at the same step, or the collective checkpoint
save would hang. SIGTERM is then left to JAX's preemption notifier (started by
`jax.distributed.initialize`): `multihost_utils.reached_preemption_sync_point(step)` is
true at the same step on every process. A SIGINT on any process is turned into the same
notice (the handler sends this process a SIGTERM), so it is agreed on as fast, within a
step or two, with no collective on the devices; the other processes then report SIGTERM.
Without a preemption service, any signal is agreed on at the next logging step (an
all-gather of one flag; the loop fetches metrics there anyway) or at the last step.
"""
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np


class StopOnSignal:
  """Context manager: `should_stop(step, at_log_step)` says when to checkpoint and stop."""

  def __init__(self):
    self.signum = 0  # the signal received (0 = none)
    self._previous = {}
    self._preemption_sync = jax.process_count() > 1

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      handled = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGINT, signal.SIGTERM]
      for s in handled:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self.signum:
      raise KeyboardInterrupt
    self.signum = signum
    if self._preemption_sync and _preemption_notifier_running():
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier: every process agrees

  def should_stop(self, step: int, at_log_step: bool) -> bool:
    """True on every process at the same step once any process received a signal."""
    if jax.process_count() == 1:
      return bool(self.signum)
    if self._preemption_sync:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = self.signum or signal.SIGTERM
          return True
      except RuntimeError:  # no preemption service in this runtime: rely on the all-gather
        self._preemption_sync = False
    if not at_log_step:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signum))  # (processes,)
    if flags.any():
      self.signum = self.signum or int(flags.max())
      return True
    return False


def _preemption_notifier_running() -> bool:
  """Whether jax.distributed started its preemption notifier (which takes SIGTERM)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
