"""MVTec AD 2 (8 classes, licence CC BY-NC-SA 4.0), multi-class by default.

  python -m dinomaly_jax.main --config=configs/mvtec_ad2.py --workdir=runs/mvtec_ad2 \
      --config.data.root=/data/mvtec_ad_2 \
      --config.encoder_weights=weights/dinov2_vitb14_reg4
  Arguments: configs/mvtec_ad2.py:vit=small,sep,method=dinomaly2,shots=4

Trains on train/good, calibrates the thresholds on validation/good (the dataset's own
calibration split), evaluates on test_public. `--mode=submit` then writes the unlabelled
test_private and test_private_mixed predictions in the evaluation server's layout.
"""
from dinomaly_jax.config import defaults


def get_config(arg=None):
  _, c = defaults.dataset_config(arg, "mvtec_ad2")
  return c
