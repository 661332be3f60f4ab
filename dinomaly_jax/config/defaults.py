"""The default configuration: every field of the reference protocol, in one place.

Configs in `configs/` start from `base_config()` and change only what differs
(dataset, steps, dropout, model size). Every deviation from the reference
protocol is a field here whose default reproduces the reference.
"""
import ml_collections

from dinomaly_jax.models import encoders

# model.vit / model.registers of the dataset configs: read from the encoder weights' meta.json.
AUTO_VIT = "auto"
AUTO_REGISTERS = -1

# The protocol's target layers of each DINOv2 ViT/14 size.
VIT_TARGET_LAYERS = {
    "small": [2, 3, 4, 5, 6, 7, 8, 9],
    "base": [2, 3, 4, 5, 6, 7, 8, 9],
    "large": [4, 6, 8, 10, 12, 14, 16, 18],
    "giant": [4, 6, 8, 10, 12, 14, 16, 18],  # not in the paper; same spacing as large
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | predict | export | compile | submit (MVTec AD 2's evaluation-server files)
  c.seed = 0

  # --- Model -----------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.family = "dinov2"  # dinov2 (ViT/14, the paper's) | dinov3 (ViT/16; see set_encoder)
  # dinov2: small | base | large | giant; dinov3: small | small_plus | base | large | huge_plus;
  # auto = the encoder weights' (dataset configs)
  m.vit = "base"
  # 0 or 4 register tokens (dinov2reg_vit_base_14 by default; DINOv3 always 4); -1 = the weights'
  m.registers = 4
  m.target_layers = list(VIT_TARGET_LAYERS["base"])  # empty = the protocol's layers for model.vit
  # Loose constraint: indices into the target-layer list, each group is a mean.
  m.fuse_groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  m.attention_impl = "auto"  # encoder softmax attention: auto | xla | cudnn | blocked
  m.bottleneck_ratio = 4  # D -> ratio*D -> D
  m.bottleneck_dropout = 0.2
  m.decoder_depth = 8
  m.decoder_attention = "linear"  # linear | softmax | qk_v_linear
  m.linear_attention_eps = 0.0  # deviation switch: eps in the linear-attention denominator
  m.mask_neighbor_size = 0  # 0 = off; n masks an n x n neighbourhood in decoder attention
  m.conv_decoder_kernel = 0  # 0 = transformer decoder; 3/5/7 = inverted-bottleneck conv decoder
  # Dinomaly2 switches (configs' `method=dinomaly2` turns them on; each works alone):
  # context-aware recentering: each encoder group's target is layer_norm(patches - class token)
  # over the features (eps 1e-8, no affine); the decoder side is unchanged.
  m.context_recentering = False
  # > 0: the two-part bottleneck Linear(D -> this) + dropout, then Linear(-> ratio*D), GELU,
  # dropout, Linear(-> D), dropout (no dropout on its input). 0 = Dinomaly's MLP. Dinomaly2: 256.
  m.bottleneck_down_dim = 0

  # Encoder weights: a directory written by `python -m weight_conversion.convert`,
  # or an official DINOv2 .pth file (converted on the fly and cached). Empty = none:
  # real configs stop with instructions; the demo sets random_encoder=True.
  c.encoder_weights = ""
  c.random_encoder = False
  # A trained work directory: a new run starts from its latest checkpoint's bottleneck and
  # decoder (same model fields and encoder), with a fresh optimizer, step 0 and its own
  # learning-rate schedule. Read only when the work directory has no checkpoint yet.
  c.init_from = ""

  # --- Data ------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.layout = "mvtec"  # mvtec | mpdd | btad | visa | realiad | folder | mvtec_ad2
  d.root = ""
  d.synthetic = False  # True: generate the demo dataset into <workdir>/demo_data and use it
  d.classes = ()  # empty = all classes found under root
  d.class_separated = False  # True: one model per class (5,000 steps each)
  # Few-shot: > 0 trains on this many normal images per class, drawn with config.seed; the
  # chosen files are written to <workdir>/shots.json and reused when the run continues.
  d.shots = 0
  # Dinomaly2 few-shot's training augmentation (`method=dinomaly2,shots=K` turns it on): a random
  # window of the crop's area (aspect 0.95-1.05) instead of the centre crop, a random multiple of
  # 90 degrees, horizontal and vertical flips. Off: training images as evaluation sees them.
  d.augment = False
  d.resize = 448
  d.crop = 392
  d.mask_size = 256
  d.workers = 2  # grain worker processes (0 = in-process)
  d.packed = ""  # a TFDS array_record directory from `python -m dinomaly_jax.data.pack`
  d.cache_features = False  # deviation switch: train on cached encoder features
  d.cache_dtype = "bfloat16"  # cached features: bfloat16 (half memory) | float32 (exact)
  d.bit_depth = 0  # bits 16-bit grayscale images use (e.g. 12); 0 = from the file (PNG sBIT, TIFF MaxSampleValue), else 16
  d.max_image_pixels = 0  # PIL's decompression-bomb limit: 0 = PIL's default (~89M pixels), -1 = no limit
  # Calibration split: normal images (never trained on) that set the decision thresholds
  # and the score normalisation. Off (the protocol trains on all of train/good).
  d.calibration = cal = ml_collections.ConfigDict()
  cal.fraction = 0.0  # >0: hold this fraction of each class's train/good out of training
  cal.folder = ""  # or: normal images of your own, <folder>/<class>/*.png

  # --- Training ----------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.steps = 10_000
  t.batch_size = 16  # global batch
  t.lr = 2e-3
  t.final_lr = 2e-4
  t.warmup_steps = 100
  t.weight_decay = 1e-4
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-10
  t.amsgrad = True
  t.lr_schedule = "warm_cosine"  # warm_cosine (warm-up, cosine to final_lr) | warmup_constant (Dinomaly2)
  # > 0: a second learning rate for the bottleneck's first Linear (same schedule, scaled by
  # bottleneck_first_lr / lr; a parameter group in torch terms). 0 = train.lr. Dinomaly2: 2e-4.
  t.bottleneck_first_lr = 0.0
  t.clip_norm = 0.1
  t.loss_p_final = 0.9  # hard-mining ratio p = min(p_final * step / p_steps, p_final)
  t.loss_p_steps = 1000
  t.easy_grad_factor = 0.1
  t.log_every = 50
  t.eval_every = 0  # 0 = evaluate only at the end
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.stop_after = 0  # >0: checkpoint and stop after this many steps (resume later in the same workdir)
  # Loss spikes (a non-finite loss, or one over spike_factor x the running median):
  # "rollback" restores the last good checkpoint, skips the offending batch and lowers
  # the learning rate by spike_lr_factor, at most spike_max_rollbacks times; "stop" stops.
  t.spike_policy = "rollback"  # rollback | stop
  t.spike_factor = 10.0  # 0 = only non-finite losses are spikes
  t.spike_window = 50  # steps in the running median
  t.spike_lr_factor = 0.5
  t.spike_max_rollbacks = 3

  # --- Evaluation ----------------------------------------------------------------
  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 16
  e.map_size = 256
  e.gaussian_size = 5
  e.gaussian_sigma = 4.0
  e.top_ratio = 0.01  # image score = mean of the top 1% of the map
  e.aupro = "reference"  # reference | mvtec
  e.aupro_max_fpr = 0.3
  e.aupro_thresholds = 200
  e.pictures_per_class = 4  # also the images per strip of report.html
  e.target_fpr = 0.01  # promised false-positive rate of the calibrated thresholds (conformal; needs >= 1/target - 1 images)

  # --- Prediction ------------------------------------------------------------------
  c.predict = p = ml_collections.ConfigDict()
  p.input = ""  # a folder or glob of images
  p.output = ""  # default: <workdir>/predictions
  p.save_maps = False  # also write each full-resolution anomaly map as <stem>_map.npy (float32)
  p.class_name = ""  # threshold of this class; default: predict.classes_csv, a class named in the path, else pooled
  p.classes_csv = ""  # a CSV of path,class rows naming each image's class (before the path rule)
  p.heatmaps = True  # write a heatmap PNG per image (False: scores and the CSV only, faster)
  p.resume = True  # skip images that already have a row in the output's predictions.csv
  # --mode=submit (data.layout mvtec_ad2): the unlabelled test splits written in the layout its
  # evaluation server expects, into predict.output (default <workdir>/submission)
  p.submission_splits = ("test_private", "test_private_mixed")

  # --- Export ----------------------------------------------------------------------
  c.export = x = ml_collections.ConfigDict()
  x.format = "jax"  # jax (jax.export, needs JAX to run) | onnx (model.onnx) | openvino (+ model.xml/.bin)
  x.platforms = ()  # format jax: e.g. ("cpu", "cuda", "tpu"); empty = the platform this runs on

  # --- Compile mode (--mode=compile): check a TPU slice before renting it ----------------
  # Compiles the train step, the evaluation map function and the exported prediction
  # function for a TPU topology on this machine (needs the [tpu] extra, no TPU) and prints
  # memory per chip, FLOPs and an estimated speed.
  c.compile = k = ml_collections.ConfigDict()
  k.topology = ""  # e.g. "v5e:2x2", "v5e:16x16", "v6e:2x4", "v5p:2x2x1" (chip:shape)
  k.functions = ("train", "eval", "predict")  # which ones to compile
  k.find_largest_batch = True  # also find the largest global batch that fits (2-4 compiles each)
  k.max_memory_gib = 0.0  # memory per chip a batch may use (e.g. to keep headroom); 0 = the chip's HBM
  return c


METHODS = ("dinomaly", "dinomaly2")
LR_SCHEDULES = ("warm_cosine", "warmup_constant")  # train.lr_schedule (training/optim.make_schedule)
DINOMALY2_STEPS = 40_000  # its multi-class iterations (batch 16, resize 448, crop 392 as Dinomaly)


def set_method(c: ml_collections.ConfigDict, method: str) -> None:
  """The config argument `method=`: "dinomaly" (the defaults) or "dinomaly2", which turns on
  each Dinomaly2 switch with its value (steps are the caller's: see dataset_config)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
  if method == "dinomaly":
    return
  c.model.context_recentering = True
  c.model.bottleneck_down_dim = 256
  c.model.bottleneck_dropout = 0.4
  c.model.linear_attention_eps = 1e-8  # LinearAttention2(eps=1e-8); decoder LayerNorms are 1e-8 in both
  c.train.amsgrad = False
  c.train.lr_schedule = "warmup_constant"
  c.train.bottleneck_first_lr = 2e-4


def parse_arg(arg: str | None, **defaults):
  """Parses a config argument string such as "vit=small,sep" into a ConfigDict.

  `key=value` sets a value (cast to the type of the default), a bare `key`
  sets a boolean default to True. Unknown keys raise a ValueError naming them.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}; expected one of "
          f"{sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key!r} must be true or false, got {value!r}.")
      result[key] = value.lower() in ("true", "1")
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise ValueError(
            f"Config argument {key!r} must be a {type(default).__name__}, "
            f"got {value!r}.") from None
  return result


def set_vit(c: ml_collections.ConfigDict, vit: str) -> None:
  """Selects the encoder size and its protocol target layers."""
  if vit not in VIT_TARGET_LAYERS:
    raise ValueError(f"vit must be one of {sorted(VIT_TARGET_LAYERS)}, got {vit!r}.")
  c.model.vit = vit
  c.model.target_layers = list(VIT_TARGET_LAYERS[vit])


def dataset_config(arg: str | None, data_layout: str, *, multi_class_steps: int = 10_000,
                   **extra_args) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(parsed arguments, config) for a dataset config file.

  Arguments `vit=small|base|large|giant` (DINOv2), `encoder=NAME` (ENCODERS, e.g.
  dinov3_vitb16; overrides vit), `sep` (class-separated: 5,000 steps per class, the
  protocol's; else `multi_class_steps`), `method=dinomaly|dinomaly2` (set_method; Dinomaly2
  trains DINOMALY2_STEPS multi-class, or `multi_class_steps` if more) and `shots=K` (few-shot:
  K training images per class, data.shots), plus `extra_args` with their defaults.
  Without `encoder=`, the register count (and without `vit=`, the DINOv2 size) is read
  from the encoder weights.
  """
  a = parse_arg(arg, vit=AUTO_VIT, encoder="", sep=False, method="dinomaly", shots=0, **extra_args)
  c = base_config()
  if a.encoder:
    set_encoder(c, a.encoder)
  elif a.vit == AUTO_VIT:
    c.model.vit, c.model.registers, c.model.target_layers = AUTO_VIT, AUTO_REGISTERS, []
  else:
    set_vit(c, a.vit)
    c.model.registers = AUTO_REGISTERS
  c.data.layout = data_layout
  c.data.class_separated = a.sep
  c.data.shots = a.shots
  set_method(c, a.method)
  c.data.augment = a.method == "dinomaly2" and a.shots > 0  # its few-shot script's augmentation
  if a.method == "dinomaly2":
    multi_class_steps = max(multi_class_steps, DINOMALY2_STEPS)
  c.train.steps = 5_000 if a.sep else multi_class_steps
  follow_steps_with_warmup(c)
  return a, c


def follow_steps_with_warmup(c: ml_collections.ConfigDict) -> None:
  """train.warmup_steps = min(100, train.steps // 10), kept so when train.steps changes later
  (`--config.train.steps=40` warms up over 4 steps); an explicit warmup_steps wins.

  The protocol's runs (5,000 steps and more) keep its 100 warm-up steps.
  """
  tenth = c.train.get_ref("steps") // 10
  cap = base_config().train.warmup_steps
  c.train.warmup_steps = (tenth + cap - abs(tenth - cap)) // 2  # min(tenth, cap), as a FieldReference


# Config argument `encoder=NAME` (the official model names) -> (family, vit, registers).
ENCODERS = {
    **{f"dinov2_vit{letter}14{suffix}": ("dinov2", vit, registers)
       for letter, vit in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
       for suffix, registers in (("", 0), ("_reg4", 4))},
    "dinov3_vits16": ("dinov3", "small", 4),
    "dinov3_vits16plus": ("dinov3", "small_plus", 4),
    "dinov3_vitb16": ("dinov3", "base", 4),
    "dinov3_vitl16": ("dinov3", "large", 4),
    "dinov3_vith16plus": ("dinov3", "huge_plus", 4),
}
# DINOv3 preset (no published protocol): the last four blocks in two groups of two, input
# resized to 512 and centre-cropped to 448 (a multiple of 16). The DINOv2 middle-layer
# preset transfers badly to DINOv3; deep layers and a larger input recover it (reported
# for ViT-L/16: blocks 20-23, groups [[0, 1], [2, 3]], 512 input, 99.28 I-AUROC on MVTec-AD).
DINOV3_FUSE_GROUPS = [[0, 1], [2, 3]]
DINOV3_RESIZE, DINOV3_CROP = 512, 448


def dinov3_target_layers(vit: str) -> list[int]:
  """The last four blocks of DINOv3 size `vit`."""
  depth = encoders.depth("dinov3", vit)
  return list(range(depth - 4, depth))


def set_encoder(c: ml_collections.ConfigDict, name: str) -> None:
  """Selects an encoder by its official name (ENCODERS) with its layer preset.

  DINOv2 names keep the protocol's layers and input size; DINOv3 names also set
  the DINOv3 preset's fuse groups and input size (data.resize, data.crop).
  """
  if name not in ENCODERS:
    raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {name!r}.")
  family, vit, registers = ENCODERS[name]
  c.model.family, c.model.registers = family, registers
  if family == "dinov2":
    set_vit(c, vit)
    return
  c.model.vit = vit
  c.model.target_layers = dinov3_target_layers(vit)
  c.model.fuse_groups = [list(g) for g in DINOV3_FUSE_GROUPS]
  c.data.resize, c.data.crop = DINOV3_RESIZE, DINOV3_CROP


def select_encoder(c: ml_collections.ConfigDict, vit: str, encoder: str) -> None:
  """The configs' `vit=` / `encoder=` arguments: `encoder`, when given, wins."""
  if encoder:
    set_encoder(c, encoder)
  else:
    set_vit(c, vit)
