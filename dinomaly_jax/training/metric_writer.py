"""Scalars to TensorBoard event files (tensorboardX) and to a JSON-lines file.

Only process 0 writes; on other processes every call is a no-op. Any work directory
(local or gs:// / s3://): the event file is written on this host's disk and copied to
<workdir>/tensorboard through `storage` at every write (a local work directory gets it
directly), and metrics.jsonl is rewritten whole (object stores cannot append).
"""
import json
import os
import shutil
import tempfile

import jax
from tensorboardX import SummaryWriter

from dinomaly_jax import storage


class MetricWriter:

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    tb_dir = storage.join(workdir, "tensorboard")
    self._remote_tb = tb_dir if storage.is_url(workdir) else None
    self._local_tb = tempfile.mkdtemp(prefix="dinomaly_tb_") if self._remote_tb else tb_dir
    self._tb = SummaryWriter(self._local_tb)
    self._jsonl_path = storage.join(workdir, "metrics.jsonl")
    self._lines = storage.read_text(self._jsonl_path) if storage.exists(self._jsonl_path) else ""

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._lines += json.dumps({"step": int(step), **scalars}) + "\n"
    storage.write_text(self._jsonl_path, self._lines)
    self._upload_events()

  def _upload_events(self) -> None:
    if self._remote_tb:
      self._tb.flush()
      for name in os.listdir(self._local_tb):
        with open(os.path.join(self._local_tb, name), "rb") as f:
          storage.write_bytes(storage.join(self._remote_tb, name), f.read())

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._upload_events()
      if self._remote_tb:
        shutil.rmtree(self._local_tb, ignore_errors=True)
