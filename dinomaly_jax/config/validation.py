"""Checks every config field before any work starts; errors name the field."""
import ml_collections

from dinomaly_jax import tpu_chips
from dinomaly_jax.config import defaults
from dinomaly_jax.data.mvtec_ad2 import UNLABELLED_SPLITS
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.models import dinomaly
from dinomaly_jax.models import encoders
from dinomaly_jax.models.structure import is_int

MODES = ("train", "eval", "predict", "export", "compile", "submit")
EXPORT_FORMATS = ("jax", "onnx", "openvino")
COMPILE_FUNCTIONS = ("train", "eval", "predict")
LAYOUTS = ("mvtec", "mpdd", "btad", "visa", "realiad", "folder", "mvtec_ad2")


def _check(ok: bool, field: str, expected: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field} must be {expected}, got {value!r}.")



def _positive_int(c, field: str) -> None:
  v = _get(c, field)
  _check(is_int(v) and v > 0, field, "a positive integer", v)


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
  _check(is_int(c.seed), "seed", "an integer", c.seed)

  m = c.model
  _one_of(c, "model.family", encoders.FAMILIES)
  if m.vit != defaults.AUTO_VIT:  # "auto" and -1 are read from the weights before the run
    _one_of(c, "model.vit", encoders.sizes(m.family))
    dinomaly.check_model_config(m)
  if m.registers != defaults.AUTO_REGISTERS:
    _one_of(c, "model.registers", encoders.register_counts(m.family))
  _one_of(c, "model.dtype", ("float32", "bfloat16"))
  _one_of(c, "model.attention_impl", ("auto", "xla", "cudnn", "blocked"))
  _positive_int(c, "model.bottleneck_ratio")
  _in_range(c, "model.bottleneck_dropout", 0.0, 1.0, hi_open=True)
  _in_range(c, "model.linear_attention_eps", 0.0, 1.0)
  _check(isinstance(m.context_recentering, bool), "model.context_recentering", "true or false",
         m.context_recentering)
  _check(is_int(m.bottleneck_down_dim) and m.bottleneck_down_dim >= 0, "model.bottleneck_down_dim",
         "an integer >= 0 (0 = Dinomaly's MLP; Dinomaly2: 256)", m.bottleneck_down_dim)

  d = c.data
  _one_of(c, "data.layout", LAYOUTS)
  _check(bool(d.root) or bool(d.packed) or d.synthetic or c.mode in ("predict", "export", "compile"), "data.root",
         "the dataset folder (e.g. --config.data.root=/data/mvtec), or data.packed a packed one", d.root)
  _positive_int(c, "data.crop")
  patch = encoders.patch_size(m.family)
  _check(d.crop % patch == 0, "data.crop", f"a multiple of the patch size {patch} ({m.family})", d.crop)
  _positive_int(c, "data.resize")
  _check(d.resize >= d.crop, "data.resize", f">= data.crop ({d.crop})", d.resize)
  _positive_int(c, "data.mask_size")
  _check(is_int(d.workers) and d.workers >= 0, "data.workers", "an integer >= 0", d.workers)
  _check(is_int(d.bit_depth) and (d.bit_depth == 0 or 8 <= d.bit_depth <= 16), "data.bit_depth",
         "0 (from the file) or an integer in [8, 16]", d.bit_depth)
  _check(is_int(d.max_image_pixels) and d.max_image_pixels >= -1, "data.max_image_pixels",
         "0 (PIL's default), -1 (no limit) or a number of pixels", d.max_image_pixels)
  _in_range(c, "data.calibration.fraction", 0.0, 0.9)
  _check(is_int(d.shots) and d.shots >= 0, "data.shots", "an integer >= 0 (0 = every training image)",
         d.shots)
  _check(not (d.shots and d.packed), "data.shots", "0 with data.packed (few-shot reads the folders)",
         d.shots)
  _check(isinstance(d.augment, bool), "data.augment", "true or false", d.augment)
  _check(not (d.augment and d.cache_features), "data.augment",
         "false with data.cache_features (cached features are of unaugmented images)", d.augment)
  _check(isinstance(d.calibration.folder, str), "data.calibration.folder", "a folder path", d.calibration.folder)
  _check(not (d.calibration.folder and d.calibration.fraction) or c.mode == "eval", "data.calibration.folder",
         "empty when training with data.calibration.fraction > 0 (one calibration source; a trained run "
         "is recalibrated from a folder with --mode=eval)", d.calibration.folder)
  _check(not (d.calibration.folder and d.packed), "data.calibration.folder",
         "empty with data.packed (use data.calibration.fraction)", d.calibration.folder)

  t = c.train
  for f in ("steps", "batch_size", "loss_p_steps", "log_every", "keep_checkpoints"):
    _positive_int(c, f"train.{f}")
  for f in ("warmup_steps", "eval_every", "checkpoint_every", "stop_after"):
    v = t[f]
    _check(is_int(v) and v >= 0, f"train.{f}", "an integer >= 0", v)
  _check(t.warmup_steps < t.steps, "train.warmup_steps",
         f"< train.steps ({t.steps}; e.g. --config.train.warmup_steps={t.steps // 10})", t.warmup_steps)
  _in_range(c, "train.lr", 1e-12, 10.0)
  _in_range(c, "train.final_lr", 0.0, t.lr)
  _one_of(c, "train.lr_schedule", defaults.LR_SCHEDULES)
  _in_range(c, "train.bottleneck_first_lr", 0.0, 10.0)
  _in_range(c, "train.weight_decay", 0.0, 1.0)
  _in_range(c, "train.b1", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.b2", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.eps", 0.0, 1.0)
  _in_range(c, "train.clip_norm", 0.0, 1e9)
  _in_range(c, "train.loss_p_final", 0.0, 1.0, hi_open=True)
  _in_range(c, "train.easy_grad_factor", 0.0, 1.0)
  _one_of(c, "train.spike_policy", ("rollback", "stop"))
  _check(t.spike_factor == 0 or (isinstance(t.spike_factor, (int, float)) and t.spike_factor > 1),
         "train.spike_factor", "0 (off) or a number > 1", t.spike_factor)
  _positive_int(c, "train.spike_window")
  _in_range(c, "train.spike_lr_factor", 1e-6, 1.0, hi_open=True)
  _check(is_int(t.spike_max_rollbacks) and t.spike_max_rollbacks >= 0, "train.spike_max_rollbacks",
         "an integer >= 0", t.spike_max_rollbacks)

  e = c.eval
  for f in ("batch_size", "map_size", "aupro_thresholds"):
    _positive_int(c, f"eval.{f}")
  _check(is_int(e.gaussian_size) and e.gaussian_size > 0 and e.gaussian_size % 2 == 1,
         "eval.gaussian_size", "an odd positive integer", e.gaussian_size)
  _in_range(c, "eval.gaussian_sigma", 1e-6, 1e6)
  _in_range(c, "eval.top_ratio", 1e-9, 1.0)
  _one_of(c, "eval.aupro", ("reference", "mvtec"))
  _in_range(c, "eval.aupro_max_fpr", 1e-9, 1.0)
  _check(is_int(e.pictures_per_class) and e.pictures_per_class >= 0, "eval.pictures_per_class",
         "an integer >= 0", e.pictures_per_class)
  _in_range(c, "eval.target_fpr", 1e-6, 0.5)
  _one_of(c, "export.format", EXPORT_FORMATS)

  k = c.compile
  if c.mode == "compile":
    _check(tpu_chips.parse_topology(k.topology) is not None, "compile.topology",
           f"a TPU topology <chip>:<shape> with chip one of {sorted(tpu_chips.CHIPS)} "
           "(e.g. v5e:2x2, v5e:16x16, v6e:2x4, v5p:2x2x1)", k.topology)
  _check(isinstance(k.functions, (tuple, list)) and len(k.functions) > 0
         and set(k.functions) <= set(COMPILE_FUNCTIONS), "compile.functions",
         f"a non-empty subset of {list(COMPILE_FUNCTIONS)}", k.functions)
  _check(isinstance(k.find_largest_batch, bool), "compile.find_largest_batch", "True or False",
         k.find_largest_batch)
  _in_range(c, "compile.max_memory_gib", 0.0, 1e6)
  splits = c.predict.submission_splits
  _check(isinstance(splits, (tuple, list)) and bool(splits) and all(s in UNLABELLED_SPLITS for s in splits),
         "predict.submission_splits", f"some of {list(UNLABELLED_SPLITS)}", splits)
