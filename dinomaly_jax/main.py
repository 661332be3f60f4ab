r"""Dinomaly-JAX: train, evaluate, predict, export.

  python -m dinomaly_jax.main --config=configs/demo.py --workdir=/tmp/dinomaly_demo
  python -m dinomaly_jax.main --config=configs/visa.py --workdir=runs/visa \
      --config.data.root=/data/VisA_pytorch/1cls --config.encoder_weights=weights/vitb14_reg4
  python -m dinomaly_jax.main --workdir=runs/visa --mode=eval
  python -m dinomaly_jax.main --workdir=runs/visa --mode=predict --config.predict.input=/data/new
  python -m dinomaly_jax.main --config=configs/mvtec.py:vit=base --workdir=/tmp/plan \
      --mode=compile --config.compile.topology=v5e:16x16   # check a TPU slice (needs [tpu])

A trained work directory keeps its configuration (config.json): eval, predict, export and
resuming need only --workdir, plus the fields that may change (data root, eval/predict options).
"""
import os
import sys
import threading
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dinomaly_jax import command_line
from dinomaly_jax import errors
from dinomaly_jax import platforms

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:args]); default: <workdir>/config.json.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, reports.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval", "predict", "export", "compile", "submit"],
                          "Overrides config.mode.")
flags.DEFINE_bool("verbose", False, f"Show tracebacks of errors (or set ${command_line.VERBOSE_ENV}=1).")
flags.mark_flags_as_required(["workdir"])

_FROM_SAVED = []  # [True] when the config is the work directory's saved one


def _parse(argv):
  logging.get_absl_handler().addFilter(_not_reported_by_main)
  if command_line.wants_help(argv):
    command_line.show_help(argv)  # exits 0
  try:
    argv, from_saved = command_line.choose_config(argv)
    _FROM_SAVED.append(from_saved)
    return command_line.parse_flags(argv)
  except errors.UsageError as e:
    command_line.fail(e, argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail_on_store_failure(e, argv)  # reading a saved config.json on gs://


def _not_reported_by_main(record) -> bool:
  """Log filter: a full disk reaches orbax's background threads first, and each logs it with a
  traceback; gcsfs logs its last failed try with one. main reports either in one line."""
  error = record.exc_info[1] if record.exc_info else RuntimeError(record.getMessage())
  if record.name.startswith("gcsfs") and "out of retries" in record.getMessage():
    return False
  return command_line.disk_full_message(error) is None


def _fail_on_store_failure(error: Exception, argv) -> None:
  """One line for an object store that failed after its client's retries; re-raises anything else."""
  message = command_line.store_failure_message(error)
  if message is None:
    raise error
  command_line.fail(errors.StorageError(message), argv)


def _drop_closed_loop_callbacks() -> None:
  """A checkpoint write that fails half-way ends orbax's event loop while tensorstore's threads
  still hand it callbacks: each (hundreds) prints "RuntimeError: Event loop is closed" through
  sys.unraisablehook, off the main thread. Those are dropped; main reports the cause in one line."""
  default = sys.unraisablehook

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and threading.current_thread() is not threading.main_thread()):
      default(unraisable)
  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _drop_closed_loop_callbacks()
  logging.set_verbosity(logging.WARNING)  # keep the libraries' INFO lines off the terminal
  platforms.use_local_hardware_only()  # libtpu installed without a TPU: stay quiet on the CPU
  try:
    config = _CONFIG.value
    if _FROM_SAVED[-1]:
      command_line.check_overrides(_WORKDIR.value, config_flags.get_override_values(flags.FLAGS["config"]))
    if _MODE.value:
      config.mode = _MODE.value
    from dinomaly_jax import run  # Imported here: jax and the stages load after the flags parse.
    run.run(config, _WORKDIR.value)
  except errors.Interrupted as e:
    command_line.fail(e, sys.argv, e.exit_code, prefix="")
  except KeyboardInterrupt:  # outside the train loop (which stops at a step itself)
    command_line.fail(errors.Interrupted(f"Interrupted. {command_line.resume_hint(_WORKDIR.value)}", 130),
                      sys.argv, 130, prefix="")
  except errors.USER_ERRORS as e:
    command_line.fail(e, sys.argv)
  except Exception as e:  # pylint: disable=broad-except
    message = command_line.disk_full_message(e)
    if message is None:
      _fail_on_store_failure(e, sys.argv)
    # A write failed half-way (a checkpoint's in orbax's background thread): one line, and an
    # exit that skips the interpreter's shutdown (its left-over tasks would each print a traceback).
    if command_line.verbose(sys.argv):
      traceback.print_exception(e)
    sys.stdout.flush()
    sys.stderr.write(f"\nerror: {message} The last finished checkpoint is intact; free some space. "
                     f"{command_line.resume_hint(_WORKDIR.value)}\n")  # one write: other threads print too
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
