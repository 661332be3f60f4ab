"""Which platform the heavy functions are traced and compiled for, and libtpu kept quiet
where there is no TPU.

`target()` is the platform the functions being built now will run on: this process's
default backend, or, inside `compiling_for("tpu")` (the compile mode, which compiles for a
TPU slice on any machine), that platform. Code that picks an implementation by platform
(attention, the CPU Dense gradient, the CPU compiler options) asks `target()`, never the
host's backend, so a TPU compile made on a CPU host is the TPU program.

With libtpu installed (the `[tpu]` extra) on a machine without TPU chips, JAX would try
the TPU backend at start-up and libtpu would print warnings about the missing TPU
environment; `use_local_hardware_only()` keeps JAX on the CPU there, and
`quiet_libtpu_without_tpu()` gives libtpu a single-host environment for compiling (and
lets several processes load it at once: there is no TPU to share).
"""
import contextlib
import glob
import importlib.util
import os

import jax

_TARGETS: list[str] = []  # a stack: compiling_for may nest


def target() -> str:
  """The platform being compiled for: "cpu", "gpu" or "tpu"."""
  return _TARGETS[-1] if _TARGETS else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, functions are traced and jitted for `platform` (e.g. "tpu" on a CPU host)."""
  _TARGETS.append(platform)
  try:
    yield
  finally:
    _TARGETS.pop()


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_chips_here() -> int | None:
  """TPU chips attached to this machine (jax's own PCI scan); None if it cannot tell."""
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except  (a private helper: any change means "unknown")
    return None


def _gpu_here() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")  # host-local: devices


def use_local_hardware_only() -> None:
  """Keeps JAX on the CPU when libtpu is installed but this machine has no TPU (and no GPU),
  unless JAX_PLATFORMS chooses. Call before the first JAX computation."""
  if os.environ.get("JAX_PLATFORMS") or not libtpu_installed() or _gpu_here():
    return
  if tpu_chips_here() == 0:
    jax.config.update("jax_platforms", "cpu")


def quiet_libtpu_without_tpu(accelerator_type: str) -> None:
  """Before libtpu loads on a machine without TPU chips (to compile for a topology): the
  environment of one TPU host, which libtpu otherwise asks a metadata server for and warns."""
  if tpu_chips_here():
    return
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to share: no lock between processes
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
