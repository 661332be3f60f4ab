"""Few-shot training (config.data.shots = K): K normal training images per class.

The choice is drawn per class from the sorted file list with a generator seeded by
config.seed and the class name, so every process draws the same files, and it is
written to `<workdir>/shots.json` (through `storage`, by process 0). A run that
continues in the same work directory reads that file back and trains on the same
images; a file that names images no longer in the training split is an error.
"""
import json
import zlib

import numpy as np

from dinomaly_jax import storage
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

SHOTS_FILE = "shots.json"


def draw(records: list[Record], shots: int, seed: int) -> dict[str, list[str]]:
  """{class: the `shots` chosen image paths, sorted}; every class needs at least `shots` images."""
  by_class: dict[str, list[str]] = {}
  for r in records:
    by_class.setdefault(r.class_name, []).append(r.image_path)
  chosen = {}
  for name, paths in sorted(by_class.items()):
    if len(paths) < shots:
      raise DataError(f"config.data.shots={shots}: class {name!r} has only {len(paths)} training "
                      f"images; expected at least {shots}.")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    paths = sorted(paths)
    chosen[name] = sorted(paths[i] for i in rng.choice(len(paths), shots, replace=False))
  return chosen


def count(records: list[Record], shots: int, seed: int) -> int:
  """How many images a run with `shots` trains on (checks every class has enough)."""
  return sum(map(len, draw(records, shots, seed).values())) if shots else len(records)


def select(records: list[Record], shots: int, seed: int, workdir: str) -> list[Record]:
  """The training records of the few-shot run in `workdir` (all of them when shots is 0)."""
  if not shots:
    return records
  path = storage.join(workdir, SHOTS_FILE)
  if storage.primary_decides(storage.exists(path)):  # one answer for every host
    saved = json.loads(storage.read_text(path))
    chosen = saved["classes"]
    known = {r.image_path for r in records}
    missing = [p for paths in chosen.values() for p in paths if p not in known]
    if saved.get("shots") != shots or missing:
      raise DataError(f"{path}: the few-shot images of this work directory ({saved.get('shots')} "
                      f"per class) do not match config.data.shots={shots} and the training split"
                      f"{f' (not found: {missing[0]})' if missing else ''}; use a new --workdir.")
  else:
    chosen = draw(records, shots, seed)
    text = json.dumps({"shots": shots, "seed": seed, "classes": chosen}, indent=2)
    storage.write_shared(path, text, barrier_name=SHOTS_FILE)
  keep = {p for paths in chosen.values() for p in paths}
  return [r for r in records if r.image_path in keep]
