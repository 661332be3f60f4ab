"""MVTec-AD (also MPDD and BTAD, same layout), multi-class by default.

  python -m dinomaly_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.data.root=/data/mvtec_anomaly_detection \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
  Arguments: configs/mvtec.py:vit=small,sep,layout=mpdd
"""
from dinomaly_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, vit="base", sep=False, layout="mvtec")
  c = config_base.base_config()
  config_base.set_vit(c, a.vit)
  c.data.layout = a.layout
  c.data.class_separated = a.sep
  c.train.steps = 5_000 if a.sep else 10_000
  return c
