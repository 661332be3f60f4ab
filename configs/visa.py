"""VisA in its 1cls layout (`python -m dinomaly_jax.data.visa_prepare` builds it).

  python -m dinomaly_jax.main --config=configs/visa.py --workdir=runs/visa \
      --config.data.root=/data/VisA_pytorch/1cls \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
  Arguments: configs/visa.py:vit=small,sep,method=dinomaly2,shots=4
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  _, c = defaults.dataset_config(arg, "visa")
  return c
