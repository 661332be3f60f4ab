"""Scalars to TensorBoard event files (tensorboardX) and to a JSON-lines file.

Only process 0 writes; on other processes every call is a no-op.
"""
import json
import os

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
