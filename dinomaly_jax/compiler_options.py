"""XLA compiler options for the heavy jitted functions: the train steps and the
encoder/decoder passes of evaluation, prediction and feature caching.

On CPU, XLA hands matrix products to YNNPACK by default. On the 2-core AMD EPYC the
benchmarks run on, XLA's other CPU path (Eigen) ran Dinomaly's products faster on one
core: (2048 x 384) @ (384 x 1536) at 114 GFLOP/s against 106, (3136 x 3072) @
(3072 x 768) at 111 against 91; the whole ViT-S/224 batch-8 train step took 3.32 s
against 3.47 s with YNNPACK products (both with models/dense_grad.py's weight
gradients). So on CPU the products go to Eigen and only reductions (the softmax's max
and sum) stay on YNNPACK. Other backends get no options. The options follow the platform
being compiled for (`platforms.target()`), not the host's: a TPU compile made on a CPU
host (the compile mode) gets none.

A user who sets `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps their
choice; a jaxlib without the option gets none (checked once, on a tiny function).
"""
import functools
import os

import jax
import numpy as np

from dinomaly_jax import platforms

_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {_YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_REDUCE"}


def heavy_jit_options() -> dict | None:
  """`compiler_options` for jax.jit of the heavy functions on the target platform."""
  return options_for(platforms.target())


@functools.cache
def options_for(platform: str) -> dict | None:
  """`compiler_options` for the heavy functions compiled for `platform`."""
  if platform != "cpu" or _YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # this jaxlib does not know the option
    return None
  return dict(CPU_OPTIONS)
