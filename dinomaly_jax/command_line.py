"""The command line -> one config, with every mistake reported as one line.

Owns: which configuration a run uses (the `--config` file, or the one saved in the work
directory), parsing the flags with one-line errors (an unknown config field names the
closest valid ones), the check that command-line overrides of a saved configuration
change only fields that may change, and how errors are shown (`--verbose` or
$DINOMALY_JAX_VERBOSE=1 adds the traceback).
"""
import difflib
import os
import sys
import traceback

from absl import flags

from dinomaly_jax import errors
from dinomaly_jax.config import defaults
from dinomaly_jax.config import saved

VERBOSE_ENV = "DINOMALY_JAX_VERBOSE"
SAVED_CONFIG_MODES = ("eval", "predict", "export", "submit")  # they always use the saved config
_SAVED_LOADER = os.path.abspath(saved.__file__)


def verbose(argv) -> bool:
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def fail(error: BaseException, argv, exit_code: int = 1, prefix: str = "error: ") -> None:
  """Prints `error` as one line (with the traceback first when verbose) and exits."""
  if verbose(argv):
    traceback.print_exception(error)
  message = str(error).strip() or type(error).__name__
  print(f"{prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


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


def _field_names(config, prefix="") -> list[str]:
  names = []
  for key, value in config.items():
    if hasattr(value, "items"):
      names += _field_names(value, f"{prefix}{key}.")
    else:
      names.append(f"{prefix}{key}")
  return names


def _unknown_field_error(argv) -> errors.UsageError | None:
  """The first --config.<field> of argv that the config does not have, with the closest names."""
  known = _field_names(defaults.base_config())
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
    if saved.is_free_field(field) or _same(old, value):
      continue
    raise errors.IncompatibleWorkdirError(
        f"--config.{field}={value!r}: {workdir} was trained with {field}={old!r}, and this field "
        "cannot change for a trained work directory (use a new --workdir to train another model).")


def _same(a, b) -> bool:
  norm = lambda v: list(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
  return norm(a) == norm(b)
