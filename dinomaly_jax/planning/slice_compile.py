"""The compile mode: check a TPU slice before renting it, on any machine.

`--mode=compile --config.compile.topology=v5e:16x16` describes the slice with libtpu
(`jax.experimental.topologies`, no TPU needed), builds a "data" mesh over its chips and
compiles, at the run's configuration (model, crop, global batch, dtype):
  train    the train step (from images; from cached features when data.cache_features),
           global batch train.batch_size;
  eval     the evaluation map function, global batch eval.batch_size;
  predict  the exported prediction function (export.py) on one chip, at eval's batch per chip.
For each it prints memory per chip (arguments, temporaries, outputs, against the chip's
HBM), FLOPs and HBM bytes per image, and an ESTIMATE of the step time and images/s from
the chip's published peak (tpu_chips.py). With compile.find_largest_batch it also finds
the largest global batch that fits: memory per chip is about linear in the batch, so two
compiles give the line, a third checks its prediction (when it is far over, memory grows
faster than the line, and a few bisections follow). A configured batch that does not
fit stops the mode with one line naming the batch, the memory and the largest that fits.
The report is also written to <workdir>/compile/<topology>.json.
"""
import dataclasses
import json
import math
import time

import jax
import ml_collections
import numpy as np

from dinomaly_jax import platforms
from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax import tpu_chips
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.inference import export
from dinomaly_jax.models import dinomaly
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import model_state
from dinomaly_jax.training import train_step

GIB = 2**30
REPORT_DIR = "compile"
MAX_PER_CHIP = 4096  # the largest per-chip batch the search considers
_HBM_SHARES = (1.0, 0.98, 0.95)  # of the memory budget, aimed at by the search's successive tries
_NEAR = 1.05  # a try at most this far over the budget is followed by the next share
BISECT_COMPILES = 6  # else (memory not linear in the batch) at most this many bisections
_FAR_UNDER = 0.85  # a fitting try under this share of the budget is followed by one further up
CLIMB_COMPILES = 3  # at most this many such tries (memory growing slower than the line)


class DoesNotFit(ConfigError):
  """The configured batch does not fit in the chip's memory."""


@dataclasses.dataclass
class Compiled:
  """What one compile for the target says, per chip."""
  per_chip_batch: int
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs that reuse donated arguments
  code_bytes: int
  flops: float
  bytes_accessed: float
  seconds: float  # the compile's wall time on this machine

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes
            + self.code_bytes)


def compile_for_slice(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The compile mode (see the module docstring); returns the report written to the workdir."""
  name = config.compile.topology
  chip, _ = tpu_chips.parse_topology(name)
  devices = _topology_devices(name)
  hosts = len({d.process_index for d in devices})
  model = dinomaly.build_model(config.model)
  m = config.model
  print(f"Compiling for {name}: {len(devices)} chips ({devices[0].device_kind}), {hosts} "
        f"host{'s' * (hosts > 1)}; {m.family} ViT-{m.vit}, crop {config.data.crop}, {m.dtype}. "
        "Each compile takes seconds (tiny models) to minutes (ViT-B and larger) on a CPU.", flush=True)
  report = {"topology": name, "chips": len(devices), "hosts": hosts, "device_kind": devices[0].device_kind,
            "chip": dataclasses.asdict(chip), "model": {"family": m.family, "vit": m.vit, "dtype": m.dtype},
            "crop": config.data.crop, "functions": {}}
  with platforms.compiling_for("tpu"):
    for function in config.compile.functions:
      report["functions"][function] = _check_function(function, config, model, devices, chip)
  storage.write_shared(storage.join(workdir, REPORT_DIR, f"{name.replace(':', '_')}.json"),
                       json.dumps(report, indent=2))
  return report


def _topology_devices(name: str) -> list:
  if not platforms.libtpu_installed():
    raise ConfigError("config.mode=compile needs libtpu to compile for a TPU: "
                      'pip install "dinomaly-jax[tpu]" (or pip install "jax[tpu]" at your jax version).')
  platforms.quiet_libtpu_without_tpu(tpu_chips.accelerator_type(name))
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)


def _check_function(function, config, model, devices, chip) -> dict:
  """Compiles `function` at the configured batch (and, if asked, finds the largest), prints it."""
  label, compile_at, chips, batch = _function(function, config, model, devices)
  if batch % chips:
    field = "train.batch_size" if function == "train" else "eval.batch_size"
    raise ConfigError(f"config.{field}={batch}: the global batch must be a multiple of the "
                      f"{len(devices)} chips of {config.compile.topology}.")
  per_chip = batch // chips
  budget_gib = config.compile.max_memory_gib or chip.hbm_gib
  room = (f"the {chip.hbm_gib:g} GiB of a {chip.name} chip" if not config.compile.max_memory_gib
          else f"the {budget_gib:g} GiB allowed per chip (compile.max_memory_gib)")
  budget = budget_gib * GIB
  tried: dict[int, Compiled | None] = {}  # None: out of the chip's memory

  def measure(b: int) -> Compiled | None:
    """The compile at per-chip batch b (once), None if out of the chip's memory."""
    if b not in tried:
      tried[b] = compile_at(b)
      memory = "out of the chip's memory" if tried[b] is None else f"{tried[b].total_bytes / GIB:.2f} GiB per chip"
      print(f"  [{label} at {b} per chip: {memory}; {'-' if tried[b] is None else f'{tried[b].seconds:.0f} s'}]",
            flush=True)
    return tried[b]

  configured = measure(per_chip)
  if configured is not None and configured.total_bytes > budget:
    configured = None
  largest = (_largest_batch(measure, per_chip, budget)
             if config.compile.find_largest_batch or configured is None else None)
  batch_word = "global batch" if chips > 1 else "batch"
  if configured is None:
    need = (tried[per_chip].total_bytes if tried[per_chip] else _line(tried).get(per_chip))
    needs = (f"{need / GIB:.2f} GiB per chip{' (extrapolated)' * (tried[per_chip] is None)}" if need
             else "more memory than a chip has")
    fits = (f"the largest {batch_word} that fits is {largest.per_chip_batch * chips} "
            f"({largest.total_bytes / GIB:.2f} GiB per chip)" if largest else
            "it does not fit even at 1 image per chip")
    raise DoesNotFit(f"{label} at {batch_word} {batch} on {config.compile.topology} needs {needs}, "
                     f"over {room}; {fits}.")
  result = _describe(configured, chips, chip)
  where = f"global batch {batch} ({per_chip} per chip" if chips > 1 else f"batch {batch} (one chip"
  print(f"{label}, {where}; compiled in {configured.seconds:.0f} s):", flush=True)
  _print_figures(result, chip)
  if largest is not None:
    result["largest_batch"] = _describe(largest, chips, chip)
    over = [b for b, c in tried.items() if b > largest.per_chip_batch and (c is None or c.total_bytes > budget)]
    result["largest_batch"]["smallest_over"] = min(over, default=None)  # per chip; None: not met
    bound = f"; {min(over)} per chip does not fit" if over else ""
    print(f"  largest {batch_word} that fits: {largest.per_chip_batch * chips} ({largest.per_chip_batch} "
          f"per chip, {largest.total_bytes / GIB:.2f} GiB, compiled; found in {len(tried)} compiles{bound}), "
          f"ESTIMATE {result['largest_batch']['estimated_images_per_s']:,.0f} images/s", flush=True)
  result["compiles"] = {str(b): (c.total_bytes if c else None) for b, c in sorted(tried.items())}
  return result


def _function(function, config, model, devices):
  """(label, compile_at(per-chip batch) -> Compiled | None, chips it runs on, global batch)."""
  crop = config.data.crop
  image = lambda n: (n, crop, crop, 3)
  if function == "predict":
    config = export.portable_config(config)
    model = dinomaly.build_model(config.model)
  state = jax.eval_shape(lambda: train_step.create_train_state(
      model, config, jax.random.key(config.seed), None, (crop, crop, 3)))
  if function == "train":
    mesh = sharding.make_mesh(devices)
    step = train_step.make_train_step(model, config, mesh, from_features=config.data.cache_features)
    state_spec = _specs(state, sharding.replicated(mesh))
    if config.data.cache_features:
      shapes = feature_cache.feature_shapes(model, (crop, crop))
      batch = lambda n: {"bottleneck_input": _f32((n, *shapes["bottleneck_input"])),  # (B, N, D)
                         "enc_groups": [_f32((n, *s)) for s in shapes["enc_groups"]]}  # [(B, h, w, D)]
      label = "train step (from cached features)"
    else:
      batch = lambda n: {"image": _f32(image(n))}  # (B, H, W, 3)
      label = "train step (from images)"
    compile_at = lambda b: _compile(step, b, state_spec,
                                    _specs(batch(b * len(devices)), sharding.data_sharding(mesh)))
    return label, compile_at, len(devices), config.train.batch_size
  variables = model_state.variables(state)
  if function == "eval":
    mesh = sharding.make_mesh(devices)
    map_fn = evaluate.make_map_fn(model, config)
    compile_at = lambda b: _compile(map_fn, b, _specs(variables, sharding.replicated(mesh)),
                                    _specs(_f32(image(b * len(devices))),
                                           sharding.data_sharding(mesh)))
    return "evaluation map function", compile_at, len(devices), config.eval.batch_size
  one_chip = sharding.replicated(sharding.make_mesh(devices[:1]))  # the exported function runs on one device
  leaves, treedef = jax.tree.flatten(variables)
  table = np.zeros((2, 3), np.float32)  # (classes, 3): the shape of a one-class calibration table
  inference = jax.jit(export.inference_function(evaluate.map_function(model, config), treedef, table))
  compile_at = lambda b: _compile(inference, b, _specs(leaves, one_chip),
                                  _specs(_f32(image(b)), one_chip),
                                  _specs(jax.ShapeDtypeStruct((b,), np.int32), one_chip))
  per_chip = -(-config.eval.batch_size // len(devices))
  return "exported prediction function", compile_at, 1, per_chip


def _f32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, np.float32)


def _specs(tree, sharding_):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def _compile(fn, per_chip_batch, *args) -> Compiled | None:
  """Compiles fn for the target; None when it does not fit in the chip's memory."""
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      return None
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Compiled(per_chip_batch, memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                  memory.output_size_in_bytes, memory.alias_size_in_bytes,
                  memory.generated_code_size_in_bytes, float(cost.get("flops", 0.0)),
                  float(cost.get("bytes accessed", 0.0)), time.perf_counter() - start)


def _line(tried: dict) -> dict:
  """Memory per chip of every tried batch, from the line through the two smallest compiled."""
  fitting = sorted((b, c.total_bytes) for b, c in tried.items() if c is not None)
  if len(fitting) < 2:
    return {}
  (b1, m1), (b2, m2) = fitting[:2]
  slope = (m2 - m1) / (b2 - b1)
  return {b: m1 + slope * (b - b1) for b in tried}


def _largest_batch(measure, per_chip: int, budget: float) -> Compiled | None:
  """The largest per-chip batch whose compile fits in `budget` bytes. Two compiled batches
  (the configured one and its double or half) give the memory line; its crossing with the
  budget is checked by a compile (if over, aiming at 98% then 95% of the budget; if far over,
  bisections; if far under, tries further up on the line through the two largest that fit)."""
  fits = lambda b: measure(b) is not None and measure(b).total_bytes <= budget
  if measure(per_chip) is None:  # out of memory: no measurement there; start from the smallest
    b1, b2, upper = 1, 2, per_chip
  elif fits(per_chip):
    b1, b2, upper = per_chip, 2 * per_chip, MAX_PER_CHIP + 1
  else:
    b1, b2, upper = per_chip // 2, per_chip, per_chip
  if b1 < 1 or b2 > upper:
    return None  # the configured batch is 1 and does not fit
  best = max([b for b in (b1, b2) if fits(b)], default=0)  # the largest batch known to fit
  c1, c2 = measure(b1), measure(b2)
  if c1 is None or c2 is None:  # a point out of the chip's memory: no line
    return measure(best) if best else None
  if not fits(b2):
    upper = min(upper, b2)
  slope = (c2.total_bytes - c1.total_bytes) / (b2 - b1)
  for share in _HBM_SHARES:  # the compiler keeps a little of the HBM (0.25 of a v5e's 16 GiB)
    guess = b1 + int((share * budget - c1.total_bytes) // slope) if slope > 0 else MAX_PER_CHIP
    guess = min(guess, upper - 1)
    if guess <= best:
      break
    if fits(guess):
      best = _climb(measure, fits, b2 if fits(b2) else b1, guess, upper, budget)
      break
    upper = guess
    if measure(guess) is None or measure(guess).total_bytes > _NEAR * budget:
      # Far over (or out of the chip's memory): memory grows faster than the line of two
      # small batches says, so aiming a little lower would miss again; bisect instead.
      best = _bisect(fits, best, upper)
      break
  if not best and b1 > 1 and upper > 1:  # the line says nothing fits below b1: it bends there
    if not fits(1):
      return None
    c1, c_over = measure(1), measure(b1)  # from 1 image per chip (fits) to b1 (over the budget)
    best = 1
    guess = min(1 + int((budget - c1.total_bytes) * (b1 - 1) // (c_over.total_bytes - c1.total_bytes)), upper - 1)
    if guess > 1 and fits(guess):
      best = guess
  return measure(best) if best else None


def _climb(measure, fits, lower: int, best: int, upper: int, budget: float) -> int:
  """From a fitting `best` far under the budget (memory grows slower than the line of two small
  batches said): up to CLIMB_COMPILES tries on the line through `best` and the fitting `lower`,
  aiming at 98% of the budget; a try over the budget is followed by bisections."""
  for _ in range(CLIMB_COMPILES):
    m_lower, m_best = measure(lower).total_bytes, measure(best).total_bytes
    if m_best >= _FAR_UNDER * budget or m_best <= m_lower:
      break
    guess = min(best + int((_HBM_SHARES[1] * budget - m_best) * (best - lower) // (m_best - m_lower)), upper - 1)
    if guess <= best:
      break
    if not fits(guess):
      return _bisect(fits, best, guess, compiles=CLIMB_COMPILES)
    lower, best = best, guess
  return best


def _bisect(fits, best: int, upper: int, compiles: int = BISECT_COMPILES) -> int:
  """The largest batch found in [best, upper) by at most `compiles` bisections (best fits,
  upper does not), stopping once the gap is under 5% of best."""
  for _ in range(compiles):
    if upper - best <= max(1, best // 20):
      break
    middle = (best + upper) // 2
    if fits(middle):
      best = middle
    else:
      upper = middle
  return best


def _describe(c: Compiled, chips: int, chip: tpu_chips.Chip) -> dict:
  b = c.per_chip_batch
  compute_s = c.flops / (chip.peak_bf16_tflops * 1e12)
  memory_s = c.bytes_accessed / (chip.hbm_gbps * 1e9)
  step_s = max(compute_s, memory_s)
  return {"global_batch": b * chips, "per_chip_batch": b,
          "memory_per_chip_gib": {"arguments": c.argument_bytes / GIB, "temporaries": c.temp_bytes / GIB,
                                  "outputs": c.output_bytes / GIB, "aliased": c.alias_bytes / GIB,
                                  "code": c.code_bytes / GIB, "total": c.total_bytes / GIB,
                                  "hbm": chip.hbm_gib},
          "gflop_per_image": c.flops / b / 1e9, "hbm_gb_per_image": c.bytes_accessed / b / 1e9,
          "estimated_step_s": step_s, "bound": "compute" if compute_s >= memory_s else "memory",
          "estimated_images_per_s": b * chips / step_s if step_s > 0 else math.inf,
          "compile_s": c.seconds}


def _print_figures(r: dict, chip: tpu_chips.Chip) -> None:
  mem = r["memory_per_chip_gib"]
  print(f"  memory per chip: arguments {mem['arguments']:.2f} GiB + temporaries {mem['temporaries']:.2f} GiB"
        f" + outputs {mem['outputs']:.2f} GiB - reused (donated) {mem['aliased']:.2f} GiB + code "
        f"{mem['code']:.2f} GiB = {mem['total']:.2f} GiB of {chip.hbm_gib:g} GiB HBM "
        f"({100 * mem['total'] / chip.hbm_gib:.1f}%)", flush=True)
  print(f"  per image: {r['gflop_per_image']:.1f} GFLOP, {r['hbm_gb_per_image']:.2f} GB of HBM traffic",
        flush=True)
  print(f"  ESTIMATE, not a measurement (roofline from the chip's published {chip.peak_bf16_tflops:g} "
        f"TFLOP/s bf16 and {chip.hbm_gbps:g} GB/s HBM): {1e3 * r['estimated_step_s']:.2f} ms per step "
        f"({r['bound']}-bound), {r['estimated_images_per_s']:,.0f} images/s", flush=True)
