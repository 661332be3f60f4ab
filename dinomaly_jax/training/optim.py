"""StableAdamW, the warm-up + cosine schedule and gradient clipping, as optax transforms.

Reference order per step t (1-based) for each tensor p with gradient g, lr = schedule(t - 1):
  p <- p * (1 - lr * wd)                        decoupled weight decay, unclipped lr
  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
  v_max <- max(v_max, v)                        (AMSGrad; else v_max = v)
  denom = sqrt(v_max) / sqrt(1 - b2^t) + eps
  scale = max(1, RMS(g / denom) / clip_threshold)
  p <- p - lr / (1 - b1^t) / scale * m / denom
Gradients are first clipped to global norm `clip_norm` as torch's clip_grad_norm_ does
(factor clip_norm / (norm + 1e-6) when below 1).

Dinomaly2 switches: `train.lr_schedule="warmup_constant"` (lr * min(step / warmup, 1), its
WarmupCosineScheduler with final ratio 1) and `train.bottleneck_first_lr` (a second learning
rate for the bottleneck's first Linear, following the same schedule: a torch parameter group).
"""
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
TORCH_CLIP_EPS = 1e-6


def warm_cosine_schedule(lr: float, final_lr: float, total_steps: int, warmup_steps: int) -> Schedule:
  """Reference WarmCosineScheduler, indexed by the 0-based step.

  Steps [0, warmup): linspace(0, lr, warmup) (step 0 -> 0, step warmup-1 -> lr).
  Steps [warmup, total): final + (lr - final)/2 * (1 + cos(pi * i / (total - warmup))),
  i = step - warmup. Steps >= total: final_lr.
  """
  if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
    raise ValueError(f"train.warmup_steps={warmup_steps} must lie in [0, train.steps="
                     f"{total_steps}] and train.steps must be > 0.")
  cosine_steps = total_steps - warmup_steps
  warmup_slope = lr / (warmup_steps - 1) if warmup_steps > 1 else 0.0

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_slope * step
    i = step - warmup_steps
    cosine = final_lr + 0.5 * (lr - final_lr) * (1.0 + jnp.cos(jnp.pi * i / max(cosine_steps, 1)))
    return jnp.where(step < warmup_steps, warm, jnp.where(step < total_steps, cosine, final_lr))

  return schedule


def warmup_constant_schedule(lr: float, warmup_steps: int) -> Schedule:
  """Dinomaly2's schedule, indexed by the 0-based step: lr * min(step / warmup_steps, 1)
  (step 0 -> 0, step warmup_steps -> lr, then constant); warmup_steps 0 = constant lr."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return lr * jnp.minimum(step / max(warmup_steps, 1), 1.0) if warmup_steps else lr + 0.0 * step

  return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6))."""

  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + TORCH_CLIP_EPS))
    return jax.tree.map(lambda g: g * factor, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class StableAdamWState(NamedTuple):
  count: jax.Array  # steps taken so far (int32)
  mu: Any
  nu: Any
  nu_max: Any  # AMSGrad running maximum of nu; None when AMSGrad is off


def stable_adamw(learning_rate: Union[float, Schedule], b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 clip_threshold: float = 1.0,
                 lr_scales: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """StableAdamW as the Dinomaly reference implements it (see the module docstring).

  lr_scales: params -> a tree of floats; each tensor's learning rate (and so its weight
  decay, p *= 1 - lr*wd) is schedule(t) times its scale (torch parameter groups).
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return StableAdamWState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros() if amsgrad else None)

  def update(grads, state, params):
    if params is None:
      raise ValueError("stable_adamw needs params (decoupled weight decay).")
    lr = schedule(state.count)
    t = (state.count + 1).astype(jnp.float32)
    bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, grads)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None

    def tensor_update(p, g, m, v, lr=lr):
      denom = jnp.sqrt(v) / jnp.sqrt(bias2) + eps
      rms = jnp.sqrt(jnp.mean(jnp.square(g / denom)))
      step_size = lr / bias1 / jnp.maximum(1.0, rms / clip_threshold)
      return -lr * weight_decay * p - step_size * m / denom

    second = nu_max if amsgrad else nu
    if lr_scales is None:
      updates = jax.tree.map(tensor_update, params, grads, mu, second)
    else:
      updates = jax.tree.map(lambda p, g, m, v, s: tensor_update(p, g, m, v, lr * s),
                             params, grads, mu, second, lr_scales(params))
    return updates, StableAdamWState(state.count + 1, mu, nu, nu_max)

  return optax.GradientTransformation(init, update)


def make_schedule(train_config) -> Schedule:
  if train_config.lr_schedule == "warmup_constant":
    return warmup_constant_schedule(train_config.lr, train_config.warmup_steps)
  return warm_cosine_schedule(train_config.lr, train_config.final_lr, train_config.steps,
                              train_config.warmup_steps)


def bottleneck_first_linear(params) -> str:
  """The name of the bottleneck's first Linear: "down" (two-part bottleneck) or "fc1"."""
  return "down" if "down" in params["bottleneck"] else "fc1"


def first_linear_lr_scales(params, scale: float):
  """A tree like params: `scale` on the bottleneck's first Linear, 1 elsewhere."""
  first = bottleneck_first_linear(params)
  return {part: jax.tree.map(lambda _: 1.0, sub) if part != "bottleneck" else
          {name: jax.tree.map(lambda _: scale if name == first else 1.0, layer)
           for name, layer in sub.items()}
          for part, sub in params.items()}


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Global-norm clip, then StableAdamW with the schedule (reference order); with
  train.bottleneck_first_lr > 0 the bottleneck's first Linear learns at that rate."""
  lr_scales = None
  if train_config.bottleneck_first_lr > 0:
    scale = train_config.bottleneck_first_lr / train_config.lr
    lr_scales = lambda params: first_linear_lr_scales(params, scale)
  return optax.chain(
      clip_by_global_norm_torch(train_config.clip_norm),
      stable_adamw(make_schedule(train_config), train_config.b1, train_config.b2,
                   train_config.eps, train_config.weight_decay, train_config.amsgrad,
                   lr_scales=lr_scales))
