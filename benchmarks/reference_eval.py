"""The reference implementation's evaluation procedure, reproduced in PyTorch for timing.

  python -m benchmarks.reference_eval --root DATA --checkpoint twin.pth [--vit small] [--crop 224]

As Dinomaly's `evaluation_batch`, class by class: a DataLoader of resized, centre-cropped,
normalised images and masks; the model's groups; per-group cosine-distance maps
upsampled (bilinear, align_corners) to the input size and averaged; maps resized to 256
(bilinear) and masks to 256 (nearest); a 5x5 Gaussian blur (sigma 4) as a convolution;
image score = mean of the top 1% of the map; then the seven metrics with scikit-learn
(roc_auc_score, average_precision_score, F1-max from precision_recall_curve, over images
and over every pixel) and the AUPRO of `compute_pro`: 200 thresholds, each binarising all
maps and labelling every mask's regions again (skimage, 8-connected). Prints the class
metrics and their mean as JSON. The checkpoint is a ViTill-named state dict
(torch_dinomaly.vitill_state_dict).
"""
import argparse
import json
import time

import numpy as np
from PIL import Image
import sklearn.metrics as skm
import torch
import torch.nn.functional as F

from benchmarks import torch_dinomaly
from benchmarks.direct_aupro import direct_reference_aupro
from dinomaly_jax.config.defaults import base_config
from dinomaly_jax.config.defaults import set_vit
from dinomaly_jax.data import index
from dinomaly_jax.data.transforms import IMAGENET_MEAN
from dinomaly_jax.data.transforms import IMAGENET_STD

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")


def f1_max(labels, scores) -> float:
  """The reference's f1_score_max: the best F1 over precision_recall_curve's thresholds."""
  precision, recall, _ = skm.precision_recall_curve(labels, scores)
  return float((2 * precision * recall / (precision + recall + 1e-7))[:-1].max())


class Images(torch.utils.data.Dataset):
  """(image (3, crop, crop), mask (1, crop, crop), label) per record, as the reference's
  transforms: resize (bilinear; masks nearest), centre crop, ImageNet normalisation."""

  def __init__(self, records, resize: int, crop: int):
    self.records, self.resize, self.crop = records, resize, crop

  def __len__(self):
    return len(self.records)

  def _crop(self, array):
    top = (self.resize - self.crop) // 2
    return array[top:top + self.crop, top:top + self.crop]

  def __getitem__(self, i):
    r = self.records[i]
    image = Image.open(r.image_path).convert("RGB").resize((self.resize,) * 2, Image.BILINEAR)
    image = (self._crop(np.asarray(image, np.float32) / 255) - IMAGENET_MEAN) / IMAGENET_STD
    if r.mask_path:
      mask = Image.open(r.mask_path).convert("L").resize((self.resize,) * 2, Image.NEAREST)
      mask = self._crop(np.asarray(mask) > 0).astype(np.float32)
    else:
      mask = np.zeros((self.crop, self.crop), np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None]), r.label


def evaluate_class(model, loader, max_ratio: float = 0.01, map_size: int = 256) -> dict:
  model.eval()
  kernel = torch_dinomaly.gaussian_kernel()
  masks, maps, labels, scores = [], [], [], []
  with torch.no_grad():
    for image, mask, label in loader:
      enc_groups, dec_groups = model(image)
      amap = torch.cat([F.interpolate((1 - F.cosine_similarity(a, b))[:, None], size=image.shape[-1],
                                      mode="bilinear", align_corners=True)
                        for a, b in zip(enc_groups, dec_groups)], 1).mean(1, keepdim=True)
      amap = F.interpolate(amap, size=map_size, mode="bilinear", align_corners=False)
      mask = F.interpolate(mask, size=map_size, mode="nearest")
      amap = F.conv2d(amap, kernel, padding=kernel.shape[-1] // 2)
      flat = amap.flatten(1)
      scores.append(torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * max_ratio)]
                    .mean(1))
      masks.append(mask.bool())
      maps.append(amap)
      labels.append(label)
  masks = torch.cat(masks)[:, 0].numpy()
  maps = torch.cat(maps)[:, 0].numpy()
  labels, scores = torch.cat(labels).numpy(), torch.cat(scores).numpy()
  aupro = direct_reference_aupro(maps, masks, 0.3, 200)
  masks, maps = masks.ravel(), maps.ravel()
  values = (skm.roc_auc_score(labels, scores), skm.average_precision_score(labels, scores),
            f1_max(labels, scores), skm.roc_auc_score(masks, maps),
            skm.average_precision_score(masks, maps), f1_max(masks, maps), aupro)
  return {name: 100 * float(v) for name, v in zip(METRICS, values)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="MVTec-layout dataset folder")
  parser.add_argument("--checkpoint", required=True, help="ViTill-named state dict (.pth)")
  parser.add_argument("--vit", default="small")
  parser.add_argument("--resize", type=int, default=256)
  parser.add_argument("--crop", type=int, default=224)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  config = base_config()
  set_vit(config, args.vit)
  config.data.root = args.root
  m = config.model
  model = torch_dinomaly.TorchDinomaly(args.vit, m.registers, m.target_layers, m.fuse_groups,
                                       m.decoder_depth, m.bottleneck_dropout)
  state = torch.load(args.checkpoint, weights_only=True)
  model.load_state_dict({("encoder.vit." + k[len("encoder."):] if k.startswith("encoder.") else k): v
                         for k, v in state.items()})
  records = index.build_records(config.data, "test")
  results = {}
  for name in sorted({r.class_name for r in records}):
    data = Images([r for r in records if r.class_name == name], args.resize, args.crop)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.workers)
    results[name] = evaluate_class(model, loader)
  results["mean"] = {k: float(np.mean([results[c][k] for c in results])) for k in METRICS}
  print(json.dumps({"metrics": results, "images": len(records),
                    "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
  main()
