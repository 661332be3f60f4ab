"""Checks every config field before any work starts; errors name the field."""
import ml_collections

from dinomaly_jax import config_base

MODES = ("train", "eval", "predict", "export")
LAYOUTS = ("mvtec", "mpdd", "btad", "visa", "realiad", "folder")


class ConfigError(ValueError):
  """A config value is missing, unknown or out of range."""


def _check(ok: bool, field: str, expected: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field} must be {expected}, got {value!r}.")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(c, field: str) -> None:
  v = _get(c, field)
  _check(_is_int(v) and v > 0, field, "a positive integer", v)


def _in_range(c, field: str, lo: float, hi: float, *, hi_open=False) -> None:
  v = _get(c, field)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if hi_open else v <= hi)
  _check(ok, field, f"a number in [{lo}, {hi}{')' if hi_open else ']'}", v)


def _one_of(c, field: str, choices) -> None:
  v = _get(c, field)
  _check(v in choices, field, f"one of {list(choices)}", v)


def _get(c, field: str):
  for part in field.split("."):
    c = c[part]
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field."""
  _one_of(c, "mode", MODES)
  _check(_is_int(c.seed), "seed", "an integer", c.seed)

  m = c.model
  _one_of(c, "model.vit", tuple(config_base.VIT_TARGET_LAYERS))
  _one_of(c, "model.registers", (0, 4))
  depth = {"small": 12, "base": 12, "large": 24, "giant": 40}[m.vit]
  layers = list(m.target_layers)
  _check(layers and all(_is_int(i) and 0 <= i < depth for i in layers)
         and len(set(layers)) == len(layers), "model.target_layers",
         f"distinct block indices in [0, {depth}) for ViT-{m.vit}", layers)
  groups = [list(g) for g in m.fuse_groups]
  _check(groups and all(g and all(_is_int(i) and 0 <= i < len(layers) for i in g) for g in groups),
         "model.fuse_groups",
         f"non-empty groups of indices into model.target_layers (0..{len(layers) - 1})", groups)
  _one_of(c, "model.dtype", ("float32", "bfloat16"))
  _one_of(c, "model.attention_impl", ("auto", "xla", "cudnn", "blocked"))
  _positive_int(c, "model.bottleneck_ratio")
  _in_range(c, "model.bottleneck_dropout", 0.0, 1.0, hi_open=True)
  _positive_int(c, "model.decoder_depth")
  _check(m.decoder_depth >= len(layers) or m.conv_decoder_kernel, "model.decoder_depth",
         f">= len(model.target_layers) = {len(layers)} (one decoder block per target layer)",
         m.decoder_depth)
  _one_of(c, "model.decoder_attention", ("linear", "softmax", "qk_v_linear"))
  _in_range(c, "model.linear_attention_eps", 0.0, 1.0)
  _check(_is_int(m.mask_neighbor_size) and m.mask_neighbor_size >= 0, "model.mask_neighbor_size",
         "an integer >= 0 (0 = off)", m.mask_neighbor_size)
  _one_of(c, "model.conv_decoder_kernel", (0, 3, 5, 7))

  d = c.data
  _one_of(c, "data.layout", LAYOUTS)
  _check(bool(d.root) or d.synthetic or c.mode in ("predict", "export"), "data.root",
         "the dataset folder (e.g. --config.data.root=/data/mvtec)", d.root)
  _positive_int(c, "data.crop")
  _check(d.crop % 14 == 0, "data.crop", "a multiple of the patch size 14", d.crop)
  _positive_int(c, "data.resize")
  _check(d.resize >= d.crop, "data.resize", f">= data.crop ({d.crop})", d.resize)
  _positive_int(c, "data.mask_size")
  _check(_is_int(d.workers) and d.workers >= 0, "data.workers", "an integer >= 0", d.workers)

  t = c.train
  for f in ("steps", "batch_size", "loss_p_steps", "log_every", "keep_checkpoints"):
    _positive_int(c, f"train.{f}")
  for f in ("warmup_steps", "eval_every", "checkpoint_every", "stop_after"):
    v = t[f]
    _check(_is_int(v) and v >= 0, f"train.{f}", "an integer >= 0", v)
  _check(t.warmup_steps < t.steps, "train.warmup_steps", f"< train.steps ({t.steps})", t.warmup_steps)
  _in_range(c, "train.lr", 1e-12, 10.0)
  _in_range(c, "train.final_lr", 0.0, t.lr)
  _in_range(c, "train.weight_decay", 0.0, 1.0)
  _in_range(c, "train.b1", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.b2", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.eps", 0.0, 1.0)
  _in_range(c, "train.clip_norm", 0.0, 1e9)
  _in_range(c, "train.loss_p_final", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.easy_grad_factor", 0.0, 1.0)

  e = c.eval
  for f in ("batch_size", "map_size", "aupro_thresholds"):
    _positive_int(c, f"eval.{f}")
  _check(_is_int(e.gaussian_size) and e.gaussian_size > 0 and e.gaussian_size % 2 == 1,
         "eval.gaussian_size", "an odd positive integer", e.gaussian_size)
  _in_range(c, "eval.gaussian_sigma", 1e-6, 1e6)
  _in_range(c, "eval.top_ratio", 1e-9, 1.0)
  _one_of(c, "eval.aupro", ("reference", "mvtec"))
  _in_range(c, "eval.aupro_max_fpr", 1e-9, 1.0)
  _check(_is_int(e.pictures_per_class) and e.pictures_per_class >= 0, "eval.pictures_per_class",
         "an integer >= 0", e.pictures_per_class)
