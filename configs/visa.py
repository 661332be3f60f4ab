"""VisA in its 1cls layout (`python -m dinomaly_jax.data.visa_prepare` builds it).

  python -m dinomaly_jax.main --config=configs/visa.py --workdir=runs/visa \
      --config.data.root=/data/VisA_pytorch/1cls \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
  Arguments: configs/visa.py:vit=small,sep
"""
from dinomaly_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, vit="base", sep=False)
  c = config_base.base_config()
  config_base.set_vit(c, a.vit)
  c.data.layout = "visa"
  c.data.class_separated = a.sep
  c.train.steps = 5_000 if a.sep else 10_000
  return c
