"""Published Dinomaly results (CVPR 2025; multi-class, ViT-B/14 with registers, 392 crop).

Class means in percent, from /work/shared/PROTOCOL.md. Keyed by `config.data.layout`;
a run is compared with them only when its classes are among the dataset's own (MPDD
and BTAD share the MVTec layout but not its classes, and get no published row).
"""
from dinomaly_jax.evaluation.metrics import METRIC_NAMES

SOURCE = "Dinomaly (CVPR 2025), multi-class, ViT-B/14-reg4, 392 crop"

_MEANS = {
    "mvtec": (99.6, 99.8, 99.0, 98.4, 69.3, 69.2, 94.8),
    "visa": (98.7, 98.9, 96.2, 98.7, 53.2, 55.7, 94.5),
    "realiad": (89.3, 86.8, 80.2, 98.8, 42.8, 47.1, 93.9),
}

CLASSES = {
    "mvtec": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
    "realiad": ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood",
                "mint", "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug",
                "porcelain_doll", "regulator", "rolled_strip_base", "sim_card_set", "switch",
                "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
                "u_block", "usb", "usb_adaptor", "vcpu", "woodstick", "woobbeam", "zipper"),
}


def published_means(dataset: str | None, class_names) -> dict[str, float] | None:
  """Metric name -> published class mean (percent), or None when the run is not comparable."""
  if dataset not in _MEANS or not set(class_names) <= set(CLASSES[dataset]):
    return None
  return dict(zip(METRIC_NAMES, _MEANS[dataset]))
