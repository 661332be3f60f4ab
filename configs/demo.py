"""The whole pipeline on CPU in a few minutes, on a dataset the project generates.

  python -m dinomaly_jax.main --config=configs/demo.py --workdir=/tmp/dinomaly_demo

The encoder has RANDOM weights (no DINOv2 download is needed), so the numbers show
that the pipeline works, not what Dinomaly reaches with DINOv2 (see README).
`configs/demo.py:encoder=dinov3_vits16` runs it with a random DINOv3 ViT-S/16
(the crop must then be a multiple of 16; 112 is). `configs/demo.py:method=dinomaly2`
runs Dinomaly2 (its switches; the demo's steps, batch and warm-up).
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  a = defaults.parse_arg(arg, steps=200, crop=112, encoder="", method="dinomaly", shots=0)
  c = defaults.base_config()
  defaults.select_encoder(c, "small", a.encoder)
  defaults.set_method(c, a.method)
  c.data.shots = a.shots
  c.data.augment = a.method == "dinomaly2" and a.shots > 0  # Dinomaly2 few-shot's augmentation
  c.random_encoder = True
  c.data.synthetic = True
  c.data.layout = "mvtec"
  c.data.crop = a.crop
  c.data.resize = a.crop * 8 // 7  # the protocol's 448 -> 392 ratio (also DINOv3's 512 -> 448)
  c.data.workers = 0
  c.data.calibration.fraction = 0.2  # 6 of each class's 30 normal images set the thresholds
  c.train.steps = a.steps
  c.train.batch_size = 8
  defaults.follow_steps_with_warmup(c)  # min(100, steps // 10), also after --config.train.steps=N
  c.train.loss_p_steps = max(1, a.steps // 3)
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.eval.batch_size = 16
  c.eval.pictures_per_class = 3
  return c
