"""A Dense layer's matrix product whose weight gradient XLA:CPU computes at full speed.

The weight gradient of y = x @ W, x (M, D), W (D, F), is x^T g: a product that
contracts the token axis M of both operands. XLA:CPU runs it with Eigen, whose speed
depends on the orientation of the result: measured on one core of a 2-core AMD EPYC
(float32, M = 2048 or 3136), a (384, 1536) result ran at 109 GFLOP/s and the same
product as (1536, 384) at 84; (768, 3072) at 107 and (3072, 768) at 93. This
function computes the gradient in the orientation whose first dimension is the
smaller (g^T x when F < D) and transposes the small (F, D) result, behind an
optimization barrier so that XLA does not fold the transpose back into the product.

The gradients are the same sums as autodiff's (tests/test_dense_grad.py checks them
to 1e-6; in a 4-block MLP at the ViT-S decoder's shapes they came out bit for bit equal). Only a Dense
layer's inputs-times-kernel product on CPU goes through here; other backends and other
contractions use lax.dot_general unchanged.
"""
import functools

import jax
from jax import lax

from dinomaly_jax import platforms


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """Drop-in `dot_general` for flax's nn.Dense (inputs (..., D) x kernel (D, F))."""
  (contracting, batch) = dimension_numbers
  is_dense = (rhs.ndim == 2 and tuple(map(tuple, contracting)) == ((lhs.ndim - 1,), (0,))
              and not any(batch) and preferred_element_type is None)
  if platforms.target() != "cpu" or not is_dense:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return _dense_product(lhs, rhs, precision)


def _product(x, kernel, precision):  # (..., D) x (D, F) -> (..., F)
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_product(x, kernel, precision):
  return _product(x, kernel, precision)


def _dense_product_fwd(x, kernel, precision):
  return _product(x, kernel, precision), (x, kernel)


def _dense_product_bwd(precision, residuals, g):
  x, kernel = residuals  # x (..., D), kernel (D, F); g (..., F)
  d, f = kernel.shape
  dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  x2, g2 = x.reshape(-1, d), g.reshape(-1, f)  # (M, D), (M, F)
  if d <= f:
    dkernel = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), precision=precision)  # (D, F)
  else:
    dkernel_t = lax.dot_general(g2, x2, (((0,), (0,)), ((), ())), precision=precision)  # (F, D)
    dkernel = lax.optimization_barrier(dkernel_t).T
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)
