"""Softmax dot-product attention, with the fastest exact implementation per backend.

Implementations (all compute softmax(q k^T * head_dim**-0.5) v, softmax in float32):
  "xla":     jax.nn.dot_product_attention(implementation="xla"), the plain formula.
  "cudnn":   cuDNN fused flash attention (GPU, bfloat16/float16, head_dim % 8 == 0).
  "blocked": a loop over small groups of heads so that each group's (N, N) logits stay
             in the CPU cache; normalisation is applied after the value product.
  "auto":    blocked on CPU; cudnn on GPU when the dtype and head_dim allow, else xla;
             xla on TPU.
"""
import jax
import jax.numpy as jnp

from dinomaly_jax import platforms

IMPLS = ("auto", "xla", "cudnn", "blocked")

# Logits bytes per loop step of the blocked path: a few MB, so that a step's (N, N)
# float32 logits stay in cache. On a 2-core AMD EPYC, 1 to 4 heads per step at N = 789
# and 1 to 19 at N = 261 ran within noise of each other, and all 2-3x faster than "xla".
_BLOCK_LOGITS_BYTES = 5 * 2**20


def dot_product_attention(q, k, v, impl: str = "auto"):
  """Softmax attention. q, k, v: (B, N, heads, head_dim) -> (B, N, heads, head_dim); scale head_dim**-0.5."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "auto":
    impl = _auto_impl(q)
  if impl == "blocked":
    return _blocked_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _auto_impl(q) -> str:
  backend = platforms.target()  # the platform compiled for (a TPU slice in the compile mode)
  if backend == "cpu":
    return "blocked"
  if backend == "gpu" and _cudnn_fits(q):
    return "cudnn"
  return "xla"


def _cudnn_fits(q) -> bool:
  """cuDNN flash attention needs a half-precision dtype and head_dim <= 128, % 8 == 0."""
  head_dim = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0


def _blocked_attention(q, k, v):
  """Exact attention looping over groups of (batch, head) pairs; same formula as xla."""
  batch, tokens, heads, head_dim = q.shape
  pairs = batch * heads
  group = _pairs_per_step(batch, heads, tokens)

  def by_pair(x):  # (B, N, H, D) -> (B*H, N, D)
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(pairs, tokens, head_dim)

  def one_pair(qkv):
    q1, k1, v1 = qkv  # (N, D) each
    logits = jnp.einsum("qd,kd->qk", q1, k1, preferred_element_type=jnp.float32)
    logits *= head_dim**-0.5
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))  # (N, N) float32
    out = jnp.einsum("qk,kd->qd", weights.astype(v1.dtype), v1,
                     preferred_element_type=jnp.float32)
    return (out / weights.sum(axis=-1, keepdims=True)).astype(v1.dtype)

  out = jax.lax.map(one_pair, (by_pair(q), by_pair(k), by_pair(v)), batch_size=group)
  return jnp.transpose(out.reshape(batch, heads, tokens, head_dim), (0, 2, 1, 3))


def _pairs_per_step(batch, heads: int, tokens: int) -> int:
  """(batch, head) pairs per loop step: as many as fit the logits budget, at most all.

  With a symbolic batch size (jax.export, ONNX export) `min(batch * heads, ...)` cannot be
  decided at trace time, so the group is the largest divisor of `heads` within the budget:
  it divides batch * heads whatever the batch, and the loop has no remainder step.
  """
  fit = max(1, _BLOCK_LOGITS_BYTES // (4 * tokens * tokens))
  if isinstance(batch, int):
    return min(batch * heads, fit)
  return max(d for d in range(1, heads + 1) if heads % d == 0 and d <= fit)
