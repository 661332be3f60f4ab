"""predictions.csv written while prediction runs: no row is lost to a kill or a bad file, and a
resumed run skips the images that already have one.

One process, a local output folder: rows are appended to predictions.csv and flushed to the
disk after each batch; a line torn by a kill is dropped when the run resumes. An object store
(gs://, s3://) cannot append, and rewriting the whole file after every batch would cost
O(rows^2) uploads: each flush there writes a part file, predictions.csv.parts/
process-<i>-part-<n>.csv (one PUT of a batch's rows); the end of the run joins predictions.csv
and the parts into predictions.csv (one rewrite) and deletes the parts. A run killed before
that keeps its parts, and the next run reads them. Duplicates (a part joined but not yet
deleted) are dropped by image path.

Several processes (each scores its own share of the images): each appends to its own part,
predictions.csv.parts/process-<i>.csv (locally; part files per batch on an object store); at
the end every process sends the primary process the rows of its parts, the primary writes
predictions.csv in input order, and after a barrier each process deletes its own parts (the
primary also those of processes a former run had and this one has not). A resumed run skips
the images with a row in predictions.csv or in any part it sees.
"""
import csv
import io
import re

from dinomaly_jax import sharding
from dinomaly_jax import storage

CSV_FILE = "predictions.csv"
PARTS = CSV_FILE + ".parts"
FIELDS = ("image", "class", "class_from", "score", "normalised_score", "threshold", "threshold_from",
          "decision", "heatmap", "error")
_PART = re.compile(r"process-(\d+)(-part-\d+)?\.csv")


def _rows_of(text: str) -> list[dict]:
  if text and not text.endswith("\n"):
    text = text[:text.rfind("\n") + 1]  # a torn last line (killed mid-write)
  return list(csv.DictReader(io.StringIO(text, newline="")))


def _text(rows, header: bool) -> str:
  out = io.StringIO(newline="")
  writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
  if header:
    writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def _unique(rows) -> list[dict]:
  """The first row of each image."""
  unique = {}
  for r in rows:
    unique.setdefault(r["image"], r)
  return list(unique.values())


def merged(rows, order: list[str]) -> list[dict]:
  """One row per image: the images of `order` (the input) in its order, after the rows of images
  it does not list (a former run's other input) in their own order."""
  position = {image: i for i, image in enumerate(order)}
  return sorted(_unique(rows), key=lambda r: position.get(r["image"], -1))


def part_process(name: str) -> int:
  """The process that wrote a part file (-1: a name this module does not write)."""
  match = _PART.fullmatch(name)
  return int(match[1]) if match else -1


class PredictionCsv:
  """Rows in, flushed per batch; `done` holds the images that already have a row.

  With several processes every process makes one (all of them, the same arguments but their
  own process_index), and every process calls close(order)."""

  def __init__(self, out_dir: str, resume: bool, process_index: int = 0, process_count: int = 1):
    self.path = storage.join(out_dir, CSV_FILE)
    self._url = storage.is_url(out_dir)
    self._parts_dir = storage.join(out_dir, PARTS)
    self._index, self._count = process_index, process_count
    self._own_prefix = f"process-{process_index:05d}"
    self._own_part = storage.join(self._parts_dir, self._own_prefix + ".csv")  # appended (local, several)
    file_rows = _rows_of(storage.read_text(self.path)) if resume and storage.exists(self.path) else []
    part_rows = {part: _rows_of(storage.read_text(part)) for part in self._part_files()} if resume else {}
    self._own = [r for part, rows in part_rows.items() if self._owner(part) == process_index for r in rows]
    # Rows no process of this run owns: the primary process keeps them.
    self._unowned = file_rows + [r for part, rows in part_rows.items()
                                 if not 0 <= self._owner(part) < process_count for r in rows]
    existing = _unique(file_rows + [r for rows in part_rows.values() for r in rows])
    self.done = {r["image"] for r in existing}
    self.skipped = len(self.done)
    self.this_run = []  # rows appended by this process; after close, on the primary: every process's
    self._part = sum(self._owner(p) == process_index for p in part_rows)
    if process_count == 1:
      if not self._url:  # rewritten once: a fresh header, a torn line dropped; the parts are in it
        storage.write_shared(self.path, _text(existing, header=True))
        self._remove_parts(mine_only=False)
      elif not resume:
        self._remove_parts(mine_only=False)
        storage.write_shared(self.path, _text([], header=True))
      return
    if not resume:
      self._remove_parts(mine_only=not storage.is_primary())
      storage.write_shared(self.path, _text([], header=True))
    storage.barrier("prediction parts ready")  # no process writes a part before they are cleared
    if not self._url:  # its own part, a torn line dropped
      storage.write_text(self._own_part, _text(self._own, header=True))

  def _owner(self, part: str) -> int:
    return part_process(storage.basename(part))

  def _part_files(self) -> list[str]:
    if not storage.isdir(self._parts_dir):
      return []
    return [storage.join(self._parts_dir, f) for f in sorted(storage.listdir(self._parts_dir))
            if f.endswith(".csv")]

  def _remove_parts(self, mine_only: bool) -> None:
    """This process's parts; unless mine_only, also those no process of this run owns."""
    for part in self._part_files():
      owner = self._owner(part)
      if owner == self._index or (not mine_only and not 0 <= owner < self._count):
        storage.remove(part)

  def append(self, rows: list[dict]) -> None:
    if not rows:
      return
    if self._url:  # one PUT by this process (its own name)
      storage.write_text(storage.join(self._parts_dir, f"{self._own_prefix}-part-{self._part:06d}.csv"),
                         _text(rows, header=True))
      self._part += 1
    else:
      storage.append_text(self._own_part if self._count > 1 else self.path, _text(rows, header=False))
    self.done.update(r["image"] for r in rows)
    self.this_run.extend(rows)

  def close(self, order: list[str] = ()) -> str:
    """Returns predictions.csv's path once it holds every row. One process: on an object store,
    joins the file and its parts. Several (call it on every process): the primary process writes
    the rows of every process's parts in the order of `order` (the input images)."""
    if self._count == 1:
      if self._url:
        parts = self._part_files()
        rows = _rows_of(storage.read_text(self.path)) if storage.exists(self.path) else []
        for part in parts:
          rows += _rows_of(storage.read_text(part))
        storage.write_shared(self.path, _text(_unique(rows), header=True))
        for part in parts:
          storage.remove(part)
      return self.path
    kept = self._own + (self._unowned if storage.is_primary() else [])
    gathered = sharding.gather_objects((kept, self.this_run))  # [(rows before this run, rows of it)]
    if storage.is_primary():
      self.this_run = [r for _, new in gathered for r in new]
      rows = [r for before, new in gathered for r in before + new]
      storage.write_shared(self.path, _text(merged(rows, list(order)), header=True))
    storage.barrier("predictions merged")  # every row is in predictions.csv: the parts can go
    self._remove_parts(mine_only=not storage.is_primary())
    return self.path
