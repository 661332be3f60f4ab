"""MVTec-AD (also MPDD and BTAD, same layout), multi-class by default.

  python -m dinomaly_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.data.root=/data/mvtec_anomaly_detection \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
  Arguments: configs/mvtec.py:vit=small,sep,layout=mpdd,method=dinomaly2,shots=4
  DINOv3 (README "DINOv3 encoders"): configs/mvtec.py:encoder=dinov3_vitl16
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  a, c = defaults.dataset_config(arg, "mvtec", layout="mvtec")
  c.data.layout = a.layout  # mpdd and btad share the MVTec-AD layout
  return c
