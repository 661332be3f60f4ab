"""Your own images: a folder of good images to train on, test folders of good and bad ones.

  <root>/<class>/train/good/*.png
  <root>/<class>/test/good/*.png, <root>/<class>/test/<defect>/*.png
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (optional)

  python -m dinomaly_jax.main --config=configs/folder.py --workdir=runs/mine \
      --config.data.root=/data/mine --config.encoder_weights=weights/dinov2_vitb14_reg4

A fifth of each class's train/good is held out of training as the calibration split
that sets the decision thresholds (config.data.calibration; `calibration=0` trains on
all of them, or --config.data.calibration.folder=/data/normal_only for your own).
Short runs: the warm-up is min(100, train.steps // 10) steps, also after
--config.train.steps=40 (4 steps); --config.train.warmup_steps=N sets it yourself.
Arguments: configs/folder.py:steps=5000,method=dinomaly2,shots=8
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  a, c = defaults.dataset_config(arg, "folder", steps=0, calibration=0.2)
  if a.steps:  # 0: the method's (10,000; Dinomaly2 40,000); also per class with `sep`
    c.train.steps = a.steps
  c.data.calibration.fraction = a.calibration
  return c
