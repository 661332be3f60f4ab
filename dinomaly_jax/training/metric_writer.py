"""Scalars to TensorBoard event files (tensorboardX) and to a JSON-lines file.

Files of the job: only the primary process writes (storage.is_primary); on the others every
call is a no-op. A local work directory gets the event file in <workdir>/tensorboard directly;
for gs:// / s3:// it is written in a folder on this host's disk and copied there through
`storage` at every write. metrics.jsonl is rewritten whole (object stores cannot append).

A run resumed from the checkpoint of step S (after a kill, or a spike rollback) trains steps
S+1.. again: their lines from before are dropped, so each step has its lines once, and
TensorBoard is told to purge its events after S (tensorboardX's purge_step). The
spike-rollback lines stay: the rollback happened, and the resumed run does not repeat it.
"""
import json
import shutil
import tempfile

from tensorboardX import SummaryWriter

from dinomaly_jax import storage


class MetricWriter:

  def __init__(self, workdir: str, start_step: int = 0):
    self._active = storage.is_primary()
    if not self._active:
      return
    tb_dir = storage.join(workdir, "tensorboard")
    self._remote_tb = tb_dir if storage.is_url(workdir) else None
    self._local_tb = tempfile.mkdtemp(prefix="dinomaly_tb_") if self._remote_tb else tb_dir
    self._tb = SummaryWriter(self._local_tb, purge_step=start_step + 1 if start_step else None)
    self._jsonl_path = storage.join(workdir, "metrics.jsonl")
    self._lines = storage.read_text(self._jsonl_path) if storage.exists(self._jsonl_path) else ""
    self.drop_after(start_step)

  def drop_after(self, step: int) -> None:
    """Forgets the lines of steps after `step` (to be trained again), spike rollbacks kept."""
    if not self._active or not self._lines:
      return
    kept = [line for line in self._lines.splitlines(keepends=True)
            if line.strip() and (json.loads(line)["step"] <= step or _is_rollback(line))]
    if len(kept) != len(self._lines.splitlines()):
      self._lines = "".join(kept)
      storage.write_shared(self._jsonl_path, self._lines)

  def has_eval(self, step: int) -> bool:
    """Whether the evaluation of `step` was logged (primary process; False on the others)."""
    if not self._active:
      return False
    records = [json.loads(line) for line in self._lines.splitlines() if line.strip()]
    return any(r["step"] == step and any(k.startswith("eval/") for k in r) for r in records)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._lines += json.dumps({"step": int(step), **scalars}) + "\n"
    storage.write_shared(self._jsonl_path, self._lines)
    self._upload_events()

  def _upload_events(self) -> None:
    if not self._remote_tb:
      return  # written in place
    self._tb.flush()
    for name in storage.listdir(self._local_tb):
      local = storage.join(self._local_tb, name)
      storage.write_shared(storage.join(self._remote_tb, name), storage.read_bytes(local))

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._upload_events()
      if self._remote_tb:
        shutil.rmtree(self._local_tb, ignore_errors=True)  # host-local: a temporary folder


def _is_rollback(line: str) -> bool:
  return "spike/rollbacks" in json.loads(line)
