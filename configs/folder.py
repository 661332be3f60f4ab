"""Your own images: a folder of good images to train on, test folders of good and bad ones.

  <root>/<class>/train/good/*.png
  <root>/<class>/test/good/*.png, <root>/<class>/test/<defect>/*.png
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (optional)

  python -m dinomaly_jax.main --config=configs/folder.py --workdir=runs/mine \
      --config.data.root=/data/mine --config.encoder_weights=weights/dinov2_vitb14_reg4
"""
from dinomaly_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, vit="base", sep=False, steps=10_000)
  c = config_base.base_config()
  config_base.set_vit(c, a.vit)
  c.data.layout = "folder"
  c.data.class_separated = a.sep
  c.train.steps = a.steps
  return c
