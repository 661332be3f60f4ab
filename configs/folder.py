"""Your own images: a folder of good images to train on, test folders of good and bad ones.

  <root>/<class>/train/good/*.png
  <root>/<class>/test/good/*.png, <root>/<class>/test/<defect>/*.png
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (optional)

  python -m dinomaly_jax.main --config=configs/folder.py --workdir=runs/mine \
      --config.data.root=/data/mine --config.encoder_weights=weights/dinov2_vitb14_reg4
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  a, c = defaults.dataset_config(arg, "folder", steps=10_000)
  c.train.steps = a.steps  # also per class with `sep`
  return c
