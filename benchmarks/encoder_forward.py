"""Encoder forward time and parity vs the official dinov2 package, per variant.

  python -m benchmarks.encoder_forward --variants small,base --size 392

For each variant: a randomised official DINOv2 model (as in the parity tests)
converted in memory; the protocol target layers (blocks up to the last one, or
every block with --full-depth) at batch 1; max abs error of JAX float32 / bfloat16 against PyTorch float32; median
forward seconds after compilation for JAX float32, JAX bfloat16 and PyTorch.
Results go to a JSON file with the date and machine.
"""
import argparse
import json
import time

from dinov2.models import vision_transformer as dinov2_vit
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import timing
from benchmarks.torch_weights import official_layers
from benchmarks.torch_weights import randomize_
from dinomaly_jax.config.defaults import VIT_TARGET_LAYERS
from dinomaly_jax.models import vit
from dinomaly_jax.weights.dinov2_keys import convert_dinov2_state_dict

_OFFICIAL_BUILDERS = {"small": dinov2_vit.vit_small, "base": dinov2_vit.vit_base,
                      "large": dinov2_vit.vit_large, "giant": dinov2_vit.vit_giant2}


def measure_variant(name: str, size: int, repeats: int, full_depth: bool) -> dict:
  kwargs = dict(ffn_layer="swiglufused") if name == "giant" else {}
  model = randomize_(_OFFICIAL_BUILDERS[name](patch_size=14, img_size=518, init_values=1.0,
                                              block_chunks=0, **kwargs), seed=0)
  params, meta = convert_dinov2_state_dict(model.state_dict())
  params = jax.device_put(params)
  layers = [vit.VIT_VARIANTS[name]["depth"] - 1] if full_depth else VIT_TARGET_LAYERS[name]
  images = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
  images_nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  reference = official_layers(model, images, layers)
  scale = max(float(np.abs(r).max()) for r in reference)
  result = dict(variant=name, size=size, batch=1, layers=layers, max_abs_reference=scale)
  forwards = {}
  for dtype in ("float32", "bfloat16"):
    encoder = vit.build_encoder(meta["vit"], meta["registers"], dtype=dtype)
    apply = jax.jit(lambda p, x, e=encoder: e.apply({"params": p}, x, layers))
    start = time.perf_counter()
    outputs = jax.block_until_ready(apply(params, images_nhwc))
    result[f"jax_{dtype}_first_call_s"] = time.perf_counter() - start
    result[f"max_abs_err_{dtype}"] = max(float(np.abs(r - np.asarray(o)).max())
                                         for r, o in zip(reference, outputs))
    forwards[f"jax_{dtype}"] = lambda f=apply: jax.block_until_ready(f(params, images_nhwc))
  with torch.no_grad():
    forwards["torch_float32"] = lambda: official_layers(model, images, layers)
    seconds = timing.interleaved_seconds(forwards, repeats)
  result.update({f"{k}_forward_s": v for k, v in seconds.items()})
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default="small,base,large")
  parser.add_argument("--size", type=int, default=392)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--full-depth", action="store_true",
                      help="run every block (last block only) instead of the protocol target layers.")
  parser.add_argument("--out", default="benchmarks/results/encoder_forward.json")
  args = parser.parse_args()
  results = []
  for name in args.variants.split(","):
    results.append(measure_variant(name, args.size, args.repeats, args.full_depth))
    print(json.dumps(results[-1]))
  timing.write_results(args.out, results)


if __name__ == "__main__":
  main()
