"""Real-IAD: 30 classes from the realiad_1024 images and realiad_jsons splits.

Multi-class: 50,000 steps with bottleneck dropout 0.4; class-separated (`sep`):
5,000 steps per class with dropout 0.2. `method=dinomaly2`: 50,000 steps, dropout 0.4.

  python -m dinomaly_jax.main --config=configs/realiad.py --workdir=runs/realiad \
      --config.data.root=/data/Real-IAD \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  a, c = defaults.dataset_config(arg, "realiad", multi_class_steps=50_000)
  if a.method == "dinomaly":  # Dinomaly2's dropout is 0.4 in every setting
    c.model.bottleneck_dropout = 0.2 if a.sep else 0.4
  return c
