"""data_config -> records: dispatches on data_config.layout (or reads a packed dataset)."""
import sys

from dinomaly_jax import storage
from dinomaly_jax.data import calibration
from dinomaly_jax.data import folder
from dinomaly_jax.data import mvtec
from dinomaly_jax.data import mvtec_ad2
from dinomaly_jax.data import packed
from dinomaly_jax.data import realiad
from dinomaly_jax.data import validate
from dinomaly_jax.data import visa
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

LAYOUTS = {"mvtec": mvtec, "mpdd": mvtec, "btad": mvtec, "visa": visa, "realiad": realiad,
           "folder": folder, "mvtec_ad2": mvtec_ad2}
SPLITS = ("train", "test", "calibration")
MAX_LISTED = 10  # ignored paths named in the warning


def _layout(data_config):
  if data_config.layout not in LAYOUTS:
    raise DataError(f"config.data.layout must be one of {sorted(LAYOUTS)}, got "
                    f"{data_config.layout!r}.")
  return LAYOUTS[data_config.layout]


def _available_classes(data_config) -> list[str]:
  if data_config.packed:
    return packed.list_classes(data_config.packed)
  return _layout(data_config).list_classes(data_config.root)


def list_classes(data_config) -> list[str]:
  """The selected classes (data_config.classes; empty = all classes found)."""
  found = _available_classes(data_config)
  chosen = list(data_config.classes)
  missing = [c for c in chosen if c not in found]
  if missing:
    where = data_config.packed or data_config.root
    raise DataError(f"{where}: class folder(s) {missing} not found; the classes there are "
                    f"{found}.")
  return chosen or found


def build_records(data_config, split: str) -> list[Record]:
  """Records of `split` for the selected classes, every file checked.

  "train" excludes the calibration images; "calibration" is empty when
  config.data.calibration is off (see data/calibration.py), except for a layout that
  ships its own calibration split (MVTec AD 2: validation/good).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  classes = list_classes(data_config)
  if split == "calibration" and data_config.calibration.folder:
    records = calibration.folder_records(data_config.calibration.folder, classes)
    validate.check_records(records)
    return records
  layout_split = calibration.layout_split(data_config)
  if split == "calibration" and layout_split:
    records = [r for c in classes for r in _layout(data_config).calibration_records(data_config.root, c)]
    validate.check_records(records)
    return records
  source = "test" if split == "test" else "train"
  if data_config.packed:
    records = packed.read_records(data_config.packed, source, classes, data_config)
  else:
    layout = _layout(data_config)
    _warn_ignored(data_config, classes)
    records = [r for c in classes for r in layout.class_records(data_config.root, c, source)]
    validate.check_records(records)
  if split == "test":
    _check_all_or_none_tested(data_config, classes, records)
    return records
  train, held_out = calibration.split_train(records, data_config.calibration.fraction)
  return train if split == "train" else held_out


def _check_all_or_none_tested(data_config, classes, records) -> None:
  """Every class has test images, or none has (a normal-only run)."""
  tested = {r.class_name for r in records}
  untested = [c for c in classes if c not in tested]
  if tested and untested:
    where = data_config.packed or data_config.root
    raise DataError(f"{where}: class(es) {untested} have no test images while {sorted(tested)} "
                    "have; give every class a test folder, or none (a normal-only run).")


_WARNED = set()  # roots whose ignored files were reported (once per process)


def _warn_ignored(data_config, classes) -> None:
  """One warning listing the files and folders under the root that are not used."""
  layout, root = _layout(data_config), data_config.root
  if not hasattr(layout, "ignored_paths") or root in _WARNED:
    return
  _WARNED.add(root)
  ignored = layout.ignored_paths(root, classes)
  if ignored:
    shown = ", ".join(storage.relpath(p, root) + ("/" if p.endswith("/") else "")
                      for p in ignored[:MAX_LISTED])
    more = f" and {len(ignored) - MAX_LISTED} more" if len(ignored) > MAX_LISTED else ""
    print(f"warning: {root}: ignored {len(ignored)} files or folders that are not images "
          f"(not trained on, not evaluated): {shown}{more}", file=sys.stderr, flush=True)
