"""Activations shared by the encoder and the decoder."""
import math

import jax


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in torch.nn.GELU's erf form: x * (1 + erf(x / sqrt(2))) / 2, in x's dtype.

  Same function as jax.nn.gelu(approximate=False), whose erfc form is slower on CPU.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))
