"""predictions.csv written while prediction runs: no row is lost to a kill or a bad file, and a
resumed run skips the images that already have one.

A local output folder: rows are appended to predictions.csv and flushed to the disk after each
batch; a line torn by a kill is dropped when the run resumes. An object store (gs://, s3://)
cannot append, and rewriting the whole file after every batch would cost O(rows^2) uploads:
each flush there writes a part file, predictions.csv.parts/part-<n>.csv (one PUT of a batch's
rows); the end of the run joins predictions.csv and the parts into predictions.csv (one
rewrite) and deletes the parts. A run killed before that keeps its parts, and the next run
reads them. Duplicates (a part joined but not yet deleted) are dropped by image path.
"""
import csv
import io

from dinomaly_jax import storage

CSV_FILE = "predictions.csv"
PARTS = CSV_FILE + ".parts"
FIELDS = ("image", "class", "class_from", "score", "normalised_score", "threshold", "threshold_from",
          "decision", "heatmap", "error")


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


class PredictionCsv:
  """Rows in, flushed per batch; `done` holds the images that already have a row."""

  def __init__(self, out_dir: str, resume: bool):
    self.path = storage.join(out_dir, CSV_FILE)
    self._url = storage.is_url(out_dir)
    self._parts_dir = storage.join(out_dir, PARTS)
    existing = self._existing() if resume else []
    self.done = {r["image"] for r in existing}
    self.skipped = len(self.done)
    self._part = len(self._part_files())
    if not self._url:  # rewritten once: a fresh header, a torn line dropped
      storage.write_shared(self.path, _text(existing, header=True))
    elif not resume:
      for part in self._part_files():
        storage.remove(part)
      storage.write_shared(self.path, _text([], header=True))

  def _part_files(self) -> list[str]:
    if not self._url or not storage.isdir(self._parts_dir):
      return []
    return [storage.join(self._parts_dir, f) for f in storage.listdir(self._parts_dir) if f.endswith(".csv")]

  def _existing(self) -> list[dict]:
    rows = _rows_of(storage.read_text(self.path)) if storage.exists(self.path) else []
    for part in self._part_files():
      rows += _rows_of(storage.read_text(part))
    unique = {}
    for r in rows:
      unique.setdefault(r["image"], r)
    return list(unique.values())

  def append(self, rows: list[dict]) -> None:
    if not rows:
      return
    if self._url:
      storage.write_shared(storage.join(self._parts_dir, f"part-{self._part:06d}.csv"), _text(rows, header=True))
      self._part += 1
    else:
      storage.append_text(self.path, _text(rows, header=False))
    self.done.update(r["image"] for r in rows)

  def close(self) -> str:
    """On an object store, joins the file and its parts into predictions.csv; returns its path."""
    if self._url:
      parts = self._part_files()
      storage.write_shared(self.path, _text(self._existing(), header=True))
      for part in parts:
        storage.remove(part)
    return self.path
