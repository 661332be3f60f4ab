"""The compile mode: a TPU slice checked on this CPU machine (libtpu, no TPU).

The command-line tests compile the tiny model (ViT-S, crop 56), cut to two encoder and two
decoder blocks (main_helpers.shallow: the compiles take seconds), for v5e:2x2 (one host)
and v5e:4x4 (four hosts); they need libtpu (`pip install -e .[tpu]`) and are skipped
only without it. The batch search and the target-platform rules are tested without it.
"""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from dinomaly_jax import compiler_options
from dinomaly_jax import platforms
from dinomaly_jax import run
from dinomaly_jax import tpu_chips
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.models import attention
from dinomaly_jax.models import dinomaly
from dinomaly_jax.planning import slice_compile
from dinomaly_jax.training import train_step
from tests import main_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not platforms.libtpu_installed(),
                                  reason="libtpu is not installed (pip install -e .[tpu]); "
                                         "the compile mode needs it to compile for a TPU")
GIB = 2**30


def _compile_mode(root, workdir, *flags):
  """The compile mode through the command line, for the shallow tiny model (main_helpers.shallow)."""
  return subprocess.run([sys.executable, "-m", "dinomaly_jax.main",
                         f"--config=tests/tiny_config.py:{root},shallow",
                         f"--workdir={workdir}", "--mode=compile", *flags], cwd=REPO, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return main_helpers.tiny_dataset(tmp_path_factory.mktemp("data"))


def _state_bytes(config) -> int:
  model = dinomaly.build_model(config.model)
  state = jax.eval_shape(lambda: train_step.create_train_state(
      model, config, jax.random.key(0), None, (config.data.crop, config.data.crop, 3)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@needs_libtpu
def test_single_host_slice_reports_memory_flops_and_an_estimate(data_root, tmp_path):
  # Maps of 64 x 64 (not 256): the map function's compiles take half as long.
  proc = _compile_mode(data_root, tmp_path, "--config.compile.topology=v5e:2x2",
                       "--config.compile.find_largest_batch=False", "--config.eval.map_size=64")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stderr.strip() == "", proc.stderr  # libtpu says nothing on a machine without a TPU
  out = proc.stdout
  assert "Compiling for v5e:2x2: 4 chips (TPU v5 lite), 1 host;" in out
  assert "train step (from images), global batch 4 (1 per chip;" in out
  assert "evaluation map function, global batch 8 (2 per chip;" in out
  assert "exported prediction function, batch 2 (one chip;" in out
  assert out.count("ESTIMATE, not a measurement") == 3
  report = json.load(open(tmp_path / "compile" / "v5e_2x2.json"))
  assert (report["chips"], report["hosts"]) == (4, 1)
  functions = report["functions"]
  config = main_helpers.shallow(main_helpers.tiny_config(data_root))
  train = functions["train"]["memory_per_chip_gib"]
  # Arguments per chip: the replicated train state and one 56x56 image, as laid out on
  # the TPU (tiling pads small arrays: within 1%); the state is donated (reused) whole.
  expected = (_state_bytes(config) + 56 * 56 * 3 * 4) / GIB
  assert train["arguments"] == pytest.approx(expected, rel=0.01)
  assert train["aliased"] == pytest.approx(_state_bytes(config) / GIB, rel=0.01)
  # Outputs beyond the donated state are the step's scalar metrics: the total is arguments,
  # temporaries and code (within 1%).
  assert train["total"] == pytest.approx(train["arguments"] + train["temporaries"] + train["code"], rel=0.01)
  # The backward pass: the train step costs more per image than the forward map.
  assert functions["train"]["gflop_per_image"] > 1.5 * functions["eval"]["gflop_per_image"]
  # The exported function is the map function plus the calibration lookup: the same work. Its
  # one-chip program is counted against eval's 4-chip partitioned one, which XLA counts 0.042
  # GFLOP per image lower (measured: eval compiled for one chip counts 0.4082, predict 0.4084).
  assert functions["predict"]["gflop_per_image"] == pytest.approx(functions["eval"]["gflop_per_image"], abs=0.05)
  chip = tpu_chips.CHIPS["v5e"]
  for name, r in functions.items():  # the roofline, recomputed from the printed figures
    chips = 1 if name == "predict" else 4
    flops = r["gflop_per_image"] * 1e9 * r["per_chip_batch"]
    traffic = r["hbm_gb_per_image"] * 1e9 * r["per_chip_batch"]
    step = max(flops / (chip.peak_bf16_tflops * 1e12), traffic / (chip.hbm_gbps * 1e9))
    assert r["estimated_step_s"] == pytest.approx(step, rel=1e-9)
    assert r["estimated_images_per_s"] == pytest.approx(r["per_chip_batch"] * chips / step, rel=1e-9)


@needs_libtpu
def test_multi_host_slice_finds_the_largest_batch_and_refuses_one_that_does_not_fit(data_root, tmp_path):
  """v5e:4x4 is 16 chips on 4 hosts. With 0.045 GiB allowed per chip (compile.max_memory_gib,
  so that the tiny model's batches stay small and quick to compile: the parameters alone are
  0.034 GiB), an evaluation batch of 16 x 4 does not fit: one line names it, its memory and the
  largest batch that does (two compiles: 4 per chip, then 2, which fits, and the memory line
  through them puts nothing larger under the budget)."""
  proc = _compile_mode(data_root, tmp_path, "--config.compile.topology=v5e:4x4",
                       "--config.compile.functions=('eval',)", f"--config.eval.batch_size={16 * 4}",
                       "--config.compile.max_memory_gib=0.045")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Compiling for v5e:4x4: 16 chips (TPU v5 lite), 4 hosts;" in proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  match = re.fullmatch(
      r"error: evaluation map function at global batch 64 on v5e:4x4 needs ([0-9.]+) GiB per chip, "
      r"over the 0.045 GiB allowed per chip \(compile.max_memory_gib\); the largest global batch that fits "
      r"is (\d+) \(([0-9.]+) GiB per chip\)\.", lines[0])
  assert match, lines[0]
  need, largest, memory = float(match[1]), int(match[2]), float(match[3])
  assert need > 0.045
  assert largest % 16 == 0 and 16 <= largest < 64
  assert 0.03 < memory <= 0.045  # checked by a compile at that batch (the parameters alone: 0.034 GiB)


def test_largest_batch_search_takes_few_compiles():
  """Memory a + s*b per chip, compiles out of memory over 20 GiB, a budget of 15.75 GiB:
  the search finds at least 97% of the true largest batch, never more, in at most 4 compiles."""
  for a, s, configured in ((0.3, 0.011, 4), (2.0, 0.9, 1), (0.1, 0.004, 1024), (5.0, 5.5, 2),
                           (0.2, 0.05, 64), (0.2, 0.05, 1000), (1.0, 3.0, 3)):
    calls = []

    def measure(b, cache={}):  # pylint: disable=dangerous-default-value
      if b not in cache:
        calls.append(b)
        total = (a + s * b) * GIB
        cache[b] = None if total > 20 * GIB else slice_compile.Compiled(b, int(total), 0, 0, 0, 0, 1.0, 1.0, 0.0)
      return cache[b]

    truth = math.floor((15.75 - a) / s)
    found = slice_compile._largest_batch(measure, configured, 15.75 * GIB)  # pylint: disable=protected-access
    assert found is not None and 0.97 * truth <= found.per_chip_batch <= truth, (a, s, configured, calls)
    assert len(calls) <= 4, calls
  # A curve that bends (fixed costs up to 2 per chip, then flat-ish): the line through the
  # configured batch and its half predicts nothing fits; 1 does, and the search finds a batch from there.
  bent = lambda b: slice_compile.Compiled(b, int((0.15 + 0.03 * min(b, 2) + 0.001 * b) * GIB), 0, 0, 0, 0, 1.0, 1.0, 0.0)
  found = slice_compile._largest_batch(bent, 64, 0.2 * GIB)  # pylint: disable=protected-access
  assert found is not None and 1 <= found.per_chip_batch and found.total_bytes <= 0.2 * GIB
  never = lambda b: slice_compile.Compiled(b, 17 * GIB, 0, 0, 0, 0, 1.0, 1.0, 0.0)
  assert slice_compile._largest_batch(never, 1, 16 * GIB) is None  # pylint: disable=protected-access
  assert slice_compile._largest_batch(lambda b: None, 8, 16 * GIB) is None  # pylint: disable=protected-access


def test_largest_batch_search_bisects_when_memory_grows_faster_than_its_line():
  """Memory a + s*b + q*b^2 per chip (as ViT-B's map function on v5e: the line through 4 and 8
  per chip put 368 under 16 GiB, and the compiler ran out of memory there), out of the chip's
  memory over 16 GiB: the search bisects and finds at least 95% of the largest batch, never
  more, in at most 3 + BISECT_COMPILES compiles."""
  for a, s, q, configured in ((0.61, 0.04, 0.000406, 4), (0.3, 0.011, 0.0001, 4), (1.0, 0.02, 0.002, 8),
                              (0.5, 0.1, 0.01, 1)):
    calls = []

    def measure(b, cache={}):  # pylint: disable=dangerous-default-value
      if b not in cache:
        calls.append(b)
        total = (a + s * b + q * b * b) * GIB
        cache[b] = None if total > 16 * GIB else slice_compile.Compiled(b, int(total), 0, 0, 0, 0, 1.0, 1.0, 0.0)
      return cache[b]

    truth = max(b for b in range(1, 5000) if a + s * b + q * b * b <= 15.75)
    found = slice_compile._largest_batch(measure, configured, 15.75 * GIB)  # pylint: disable=protected-access
    assert found is not None and 0.95 * truth <= found.per_chip_batch <= truth, (a, s, q, calls)
    assert len(calls) <= 3 + slice_compile.BISECT_COMPILES, calls


def test_largest_batch_search_climbs_when_memory_grows_slower_than_its_line():
  """Memory a + s*b^p (p < 1) per chip (as ViT-S's map function on v6e: the line through 4 and 8
  per chip put 868 at 32 GiB, and it compiled at 23.3): the search tries further up and ends
  at 85% of the budget or more, never over, in at most 3 + CLIMB_COMPILES compiles."""
  for a, s, p, configured in ((0.23, 0.045, 0.94, 4), (0.3, 0.2, 0.8, 4), (1.0, 0.5, 0.7, 8), (0.1, 0.05, 0.9, 1)):
    calls = []

    def measure(b, cache={}):  # pylint: disable=dangerous-default-value
      if b not in cache:
        calls.append(b)
        total = (a + s * b**p) * GIB
        cache[b] = None if total > 34 * GIB else slice_compile.Compiled(b, int(total), 0, 0, 0, 0, 1.0, 1.0, 0.0)
      return cache[b]

    truth = max(b for b in range(1, 20000) if a + s * b**p <= 31.75)
    found = slice_compile._largest_batch(measure, configured, 31.75 * GIB)  # pylint: disable=protected-access
    assert found is not None and found.per_chip_batch <= truth, (a, s, p, calls)
    assert found.total_bytes >= slice_compile._FAR_UNDER * 31.75 * GIB, (a, s, p, calls)  # pylint: disable=protected-access
    assert len(calls) <= 3 + slice_compile.CLIMB_COMPILES, calls


def test_compile_options_and_attention_follow_the_target_not_the_host():
  q = np.zeros((1, 4, 2, 8), np.float32)
  assert jax.default_backend() == "cpu"
  assert attention._auto_impl(q) == "blocked"  # pylint: disable=protected-access
  with platforms.compiling_for("tpu"):
    assert compiler_options.heavy_jit_options() is None
    assert attention._auto_impl(q) == "xla"  # pylint: disable=protected-access
  assert platforms.target() == "cpu"


def test_missing_libtpu_is_one_line(data_root, tmp_path, monkeypatch):
  monkeypatch.setattr(platforms, "libtpu_installed", lambda: False)
  config = main_helpers.tiny_config(data_root)
  config.mode, config.compile.topology = "compile", "v5e:2x2"
  with pytest.raises(ConfigError, match=r'needs libtpu to compile for a TPU: pip install "dinomaly-jax\[tpu\]"'):
    run.run(config, str(tmp_path))


@pytest.mark.parametrize("topology", ["v5e", "v4:2x2x1", "v5e:2x", "tpu:2x2"])
def test_bad_topology_is_one_line(data_root, tmp_path, topology):
  config = main_helpers.tiny_config(data_root)
  config.mode, config.compile.topology = "compile", topology
  with pytest.raises(ConfigError, match=r"config.compile.topology must be a TPU topology <chip>:<shape> "):
    run.run(config, str(tmp_path))


@needs_libtpu
def test_libtpu_without_a_tpu_leaves_a_cpu_run_quiet():
  code = ("from dinomaly_jax import platforms; platforms.use_local_hardware_only(); "
          "import jax; print(jax.devices()[0].platform)")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
  assert (proc.returncode, proc.stdout.strip(), proc.stderr.strip()) == (0, "cpu", "")
