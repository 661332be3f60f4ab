"""data_config -> records: dispatches on data_config.layout (or reads a packed dataset)."""
from dinomaly_jax.data import calibration
from dinomaly_jax.data import folder
from dinomaly_jax.data import mvtec
from dinomaly_jax.data import packed
from dinomaly_jax.data import realiad
from dinomaly_jax.data import validate
from dinomaly_jax.data import visa
from dinomaly_jax.data.records import Record
from dinomaly_jax.errors import DataError

LAYOUTS = {"mvtec": mvtec, "mpdd": mvtec, "btad": mvtec, "visa": visa, "realiad": realiad,
           "folder": folder}
SPLITS = ("train", "test", "calibration")


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
  config.data.calibration is off (see data/calibration.py).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  classes = list_classes(data_config)
  if split == "calibration" and data_config.calibration.folder:
    records = calibration.folder_records(data_config.calibration.folder, classes)
    validate.check_records(records)
    return records
  source = "test" if split == "test" else "train"
  if data_config.packed:
    records = packed.read_records(data_config.packed, source, classes, data_config)
  else:
    layout = _layout(data_config)
    records = [r for c in classes for r in layout.class_records(data_config.root, c, source)]
    validate.check_records(records)
  if split == "test":
    return records
  train, held_out = calibration.split_train(records, data_config.calibration.fraction)
  return train if split == "train" else held_out
