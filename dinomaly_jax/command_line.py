"""The command line -> one config, with every mistake reported as one line.

Owns: which configuration a run uses (the `--config` file, or the one saved in the work
directory), parsing the flags with one-line errors (an unknown config field names the
closest valid ones), the check that command-line overrides of a saved configuration
change only fields that may change, how errors are shown (`--verbose` or
$DINOMALY_JAX_VERBOSE=1 adds the traceback), and the help (`--help`, `-h`, `--helpfull`).
"""
import difflib
import os
import re
import sys
import traceback

from absl import flags

from dinomaly_jax import errors
from dinomaly_jax.config import defaults
from dinomaly_jax.config import saved

VERBOSE_ENV = "DINOMALY_JAX_VERBOSE"
SAVED_CONFIG_MODES = ("eval", "predict", "export", "submit")  # they always use the saved config
HELP_FLAGS = ("-h", "--help", "--helpshort", "-?", "--helpfull")
MODES = (
    ("train", "train in --workdir (or resume its latest checkpoint), then evaluate (the default)"),
    ("eval", "evaluate the latest checkpoint of --workdir: reports, thresholds, pictures in <workdir>/eval"),
    ("predict", "score new images (--config.predict.input=FOLDER_OR_GLOB): heatmaps, predictions.csv"),
    ("export", "write <workdir>/export: the inference function (jax.export, ONNX or OpenVINO), export_info.json"),
    ("submit", "MVTec AD 2: the unlabelled test splits as the evaluation server's files"),
    ("compile", "compile for a TPU slice on this machine (--config.compile.topology=v5e:2x2): memory, FLOPs"),
)
# The fields a first run sets or looks at, with what they mean (--helpfull lists every field).
MAIN_FIELDS = (
    ("data.root", "dataset folder"),
    ("data.layout", "mvtec | mpdd | btad | visa | realiad | folder"),
    ("data.packed", "a packed dataset (python -m dinomaly_jax.data.pack) instead of data.root"),
    ("data.classes", "classes to use; empty = all found"),
    ("encoder_weights", "converted DINOv2/DINOv3 directory or official .pth (python -m weight_conversion.convert)"),
    ("model.vit", "encoder size; auto = from the weights"),
    ("train.steps", "training steps (the learning-rate schedule spans them)"),
    ("train.batch_size", "global batch"),
    ("train.warmup_steps", "linear warm-up steps"),
    ("train.stop_after", "checkpoint and stop after this many steps (resume later)"),
    ("init_from", "a trained work directory whose bottleneck + decoder start a new run"),
    ("eval.pictures_per_class", "pictures per class in the report"),
    ("predict.input", "images to score (a folder or glob) in --mode=predict"),
    ("predict.output", "default: <workdir>/predictions"),
    ("export.platforms", "e.g. \"('cpu','cuda')\"; empty = this platform"),
)
_SAVED_LOADER = os.path.abspath(saved.__file__)  # host-local: this package's own file


def verbose(argv) -> bool:
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def fail(error: BaseException, argv, exit_code: int = 1, prefix: str = "error: ") -> None:
  """Prints `error` as one line (with the traceback first when verbose) and exits."""
  if verbose(argv):
    traceback.print_exception(error)
  message = str(error).strip() or type(error).__name__
  print(f"{prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


_DISK_FULL_ERRNOS = {28: "the disk is full (no space left on the device)", 122: "the disk quota is used up",
                     27: "the file outgrew this process's file-size limit (ulimit -f)"}


def disk_full_message(error: BaseException) -> str | None:
  """One line for an error that is a full disk wherever it was raised (an OSError with ENOSPC,
  EDQUOT or EFBIG; or tensorstore's error with that os_error_code, from a checkpoint write):
  the path and which limit it met; None for any other error."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return f"{error.filename or 'a file'}: {_DISK_FULL_ERRNOS[error.errno]}."
    code = re.search(r"\[os_error_code='(\d+)'\]", str(error))
    if code and int(code[1]) in _DISK_FULL_ERRNOS:
      path = re.search(r'Failed (?:writing|to write)[^"]*"([^"]+)"', str(error)) or re.search(r'"(/[^"]+)"', str(error))
      return f"{path[1] if path else 'a checkpoint file'}: {_DISK_FULL_ERRNOS[int(code[1])]}."
    error = error.__cause__ or error.__context__
  return None


_STORE_CLIENTS = ("gcsfs", "s3fs", "aiohttp", "botocore", "aiobotocore", "requests")


def store_failure_message(error: BaseException) -> str | None:
  """One line for an object-store request that still failed after its client's own retries
  (gcsfs: 6 tries with exponential backoff; s3fs: botocore's); None for any other error."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if type(error).__module__.split(".")[0] in _STORE_CLIENTS:
      return (f"the object store failed after its client's retries: {type(error).__name__}: "
              f"{str(error).strip() or 'no reply'}.")
    error = error.__cause__ or error.__context__
  return None


def resume_hint(workdir: str) -> str:
  if saved.exists_in(workdir):
    return f"Resume with: python -m dinomaly_jax.main --workdir={workdir}"
  return f"Nothing was written to {workdir}."


def _flag_value(argv, name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one wins), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _without_flag(argv, name: str) -> list[str]:
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == f"--{name}":
      skip = True
    elif not arg.startswith(f"--{name}="):
      out.append(arg)
  return out


def choose_config(argv) -> tuple[list[str], bool]:
  """(argv to parse, whether the config is the work directory's saved one).

  The saved config.json is used when no --config is given (resume, or any mode in a
  trained work directory) and always in eval/predict/export mode.
  """
  workdir = _flag_value(argv, "workdir")
  config_file = _flag_value(argv, "config")
  mode = _flag_value(argv, "mode") or _flag_value(argv, "config.mode")
  has_saved = bool(workdir) and saved.exists_in(workdir)
  if config_file is None and not has_saved:
    where = f"{workdir} holds no {saved.CONFIG_FILE}" if workdir else "no --workdir is given"
    raise errors.UsageError(f"--config is required ({where}): e.g. --config=configs/folder.py.")
  if has_saved and (config_file is None or mode in SAVED_CONFIG_MODES):
    if config_file is not None:
      print(f"Using the configuration saved in {saved.path_in(workdir)}; --config={config_file} "
            "is not needed.", flush=True)
    return [argv[0], f"--config={_SAVED_LOADER}:{workdir}", *_without_flag(argv[1:], "config")], True
  return list(argv), False


def wants_help(argv) -> bool:
  return any(arg in HELP_FLAGS for arg in argv[1:])


def show_help(argv) -> None:
  """Prints the help and exits 0: the fields' values are those of --config, or of the work
  directory's saved config, else the defaults."""
  rest = [a for a in argv if a not in HELP_FLAGS]
  if _flag_value(rest, "workdir") is None:
    rest.append("--workdir=")  # not used: the help only needs the config
  try:
    config_argv, from_saved = choose_config(rest)
    parse_flags(config_argv)
    config = flags.FLAGS["config"].value
    source = str(saved.path_in(_flag_value(rest, "workdir"))) if from_saved else _flag_value(rest, "config")
  except errors.UsageError as e:
    why = "--config or --workdir shows a config's" if "is required" in str(e) else str(e)
    config, source = defaults.base_config(), f"the defaults; {why}"
  print(help_text(config, flags.FLAGS.main_module_help(), full="--helpfull" in argv, source=source), end="")
  sys.exit(0)


def help_text(config, flags_help: str, *, full: bool, source: str) -> str:
  """Usage, the modes, the main config fields with their values in `config` (every field
  when `full`) and the flags."""
  values = _field_values(config)
  lines = [
      "Dinomaly-JAX: train, evaluate, predict, export.", "",
      "Usage:",
      "  python -m dinomaly_jax.main --config=configs/<dataset>.py[:args] --workdir=DIR [--config.<field>=value ...]",
      "  python -m dinomaly_jax.main --workdir=DIR [--mode=eval|predict|export] [--config.<field>=value ...]",
      "  (a trained work directory keeps its configuration in config.json: --workdir is then enough)", "",
      "Configs: configs/mvtec.py (args vit=small|base|large|giant, encoder=NAME, sep, layout=mpdd|btad),",
      "  configs/visa.py, configs/realiad.py, configs/folder.py (your own images), configs/demo.py (generated data)",
      "", "Modes (--mode):"]
  lines += [f"  {name:8} {what}" for name, what in MODES]
  title = "Config fields" if full else "Main config fields"
  lines += ["", f"{title} (--config.<field>=value; values of {source}):"]
  shown = sorted(values) if full else [f for f, _ in MAIN_FIELDS]
  meaning = dict(MAIN_FIELDS)
  width = max(len(f) for f in shown) + 1
  value_width = min(max(len(repr(values[f])) for f in shown), 30) + 1
  for field in shown:
    text = f"  {field:{width}} {values[field]!r:{value_width}} {meaning.get(field, '')}"
    lines.append(text.rstrip())
  if not full:
    lines.append("  (--helpfull lists every field; README.md, 'Configuration reference', says what each means)")
  flag_lines = [line for line in flags_help.splitlines() if line.startswith(" ")]  # not the module's path
  lines += ["", "Flags:", *flag_lines]
  return "\n".join(lines) + "\n"


def _field_values(config, prefix="") -> dict:
  values = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      values.update(_field_values(value, f"{prefix}{key}."))
    else:
      values[f"{prefix}{key}"] = value
  return values


def _unknown_field_error(argv) -> errors.UsageError | None:
  """The first --config.<field> of argv that the config does not have, with the closest names."""
  known = list(_field_values(defaults.base_config()))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    field = arg[len("--config."):].split("=", 1)[0]
    if field not in known:
      close = closest_fields(field, known)
      hint = f"; closest: {', '.join(close)}" if close else ""
      return errors.UsageError(f"--config.{field}: unknown config field{hint}.")
  return None


def closest_fields(field: str, known: list[str], n: int = 3) -> list[str]:
  """Valid names near `field`: an abbreviation or part of its last name in the same section
  ("train.learning_rate" -> "train.lr"), then the closest spellings."""
  section, _, leaf = field.rpartition(".")
  initials = "".join(w[0] for w in leaf.split("_") if w)
  near = [k for k in known if k.rpartition(".")[0] == section and len(k.rpartition(".")[2]) > 1
          and (k.rpartition(".")[2] in (initials, leaf[:2]) or k.rpartition(".")[2] in leaf
               or leaf in k.rpartition(".")[2])]
  near += difflib.get_close_matches(field, known, n=n, cutoff=0.5)
  return list(dict.fromkeys(near))[:n]


def _last_line(text: str) -> str:
  """The message of a flags error (config-file errors carry a whole traceback in it)."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  last = lines[-1] if lines else text
  for prefix in ("ValueError: ", "OSError: ", "IOError: ", "KeyError: ", "TypeError: "):
    if last.startswith(prefix):
      return last[len(prefix):]
  return last


def parse_flags(argv) -> list[str]:
  """flags.FLAGS(argv) with every failure raised as a one-line UsageError."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS["config"].value.get("mode")  # a config file that failed to load raises here
    return rest
  except OSError as e:
    raise errors.UsageError(f"--config={_flag_value(argv, 'config')}: cannot load it "
                            f"({_last_line(str(e))}).") from e
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    raise _unknown_field_error(argv) or errors.UsageError(_last_line(str(e))) from e
  except flags.Error as e:
    raise _unknown_field_error(argv) or errors.UsageError(_last_line(str(e))) from e


def check_overrides(workdir: str, overrides: dict) -> None:
  """Refuses a command-line value that would change a fixed field of the saved config."""
  before = saved.load(workdir)
  for field, value in sorted(overrides.items()):
    old = before
    for part in field.split("."):
      old = old[part]
    if saved.may_change(field, old, value) or _same(old, value):
      continue
    can = ("may only grow (a larger value trains the run further)" if field == "train.steps"
           else "cannot change for a trained work directory")
    instead = ("use a new --workdir to train another model" if field.startswith("model.") else
               f"to train another model from this one's weights: a new --workdir with --config=... "
               f"--config.init_from={workdir}")
    raise errors.IncompatibleWorkdirError(
        f"--config.{field}={value!r}: {workdir} was trained with {field}={old!r}, and this field "
        f"{can} ({instead}).")


def _same(a, b) -> bool:
  norm = lambda v: list(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
  return norm(a) == norm(b)
