"""Published per-chip figures of the TPUs the compile mode knows, and topology names.

Sources (Cloud TPU documentation, "System architecture" tables, read 2026-12-07):
  v5e  https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s bf16, HBM2 16 GB, 819 GB/s
  v5p  https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s bf16, HBM2e 95 GB, 2765 GB/s
  v6e  https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s bf16, HBM 32 GB, 1638 GB/s
The memory figures are taken as GiB: the TPU compiler itself reported 15.75 GiB usable
of a v5e's "16 GB" (the rest is reserved). They give a roofline ESTIMATE of the step
time (max(FLOPs / peak, bytes / bandwidth)), a bound no real program reaches.
"""
import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # HBM per chip
  peak_bf16_tflops: float  # peak dense bf16 FLOP/s per chip, in 1e12
  hbm_gbps: float  # HBM bandwidth per chip, in 1e9 bytes/s
  accelerator_prefix: str  # Cloud TPU accelerator type: <prefix><chips x cores per chip>
  cores_per_chip: int  # in the accelerator type's count (v5p counts 2 per chip)


CHIPS = {
    "v5e": Chip("v5e", 16, 197, 819, "v5litepod-", 1),
    "v5p": Chip("v5p", 95, 459, 2765, "v5p-", 2),
    "v6e": Chip("v6e", 32, 918, 1638, "v6e-", 1),
}

_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]] | None:
  """"v5e:2x2" -> (the v5e Chip, (2, 2)); None if the name is not <known chip>:<AxB[xC]>."""
  match = _TOPOLOGY.match(name)
  if not match or match.group(1) not in CHIPS:
    return None
  return CHIPS[match.group(1)], tuple(int(n) for n in match.group(2).split("x"))


def accelerator_type(name: str) -> str:
  """"v5e:2x2" -> "v5litepod-4" (what a Cloud TPU VM of that slice reports)."""
  chip, shape = parse_topology(name)
  return f"{chip.accelerator_prefix}{math.prod(shape) * chip.cores_per_chip}"
