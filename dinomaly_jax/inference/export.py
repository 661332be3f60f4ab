"""Export of the inference function with jax.export: runs with jax + numpy alone.

Writes <workdir>/export/: inference.jax_export (StableHLO, symbolic batch size),
params.npz (the parameters, in the order the function takes them) and
export_info.json (input size, normalisation, map size). Load it with
`dinomaly_jax.inference.exported_model.load` (which imports nothing else of this package)
or the few lines of the README.
"""
import copy
import json
import os

import jax
import ml_collections
import numpy as np

from dinomaly_jax import sharding
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.training import model_state

EXPORT_DIR = "export"


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Serializes (params, images (b, crop, crop, 3)) -> (maps, scores) into <workdir>/export."""
  config = copy.deepcopy(config)
  config.model.attention_impl = "xla"  # portable, and traceable with a symbolic batch size
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh)
  map_fn = evaluate.make_map_fn(model, config)
  variables = jax.device_get(model_state.variables(state))
  leaves, treedef = jax.tree.flatten(variables)

  def inference(param_leaves, images):
    return map_fn(jax.tree.unflatten(treedef, param_leaves), images)

  crop = config.data.crop
  (batch,) = jax.export.symbolic_shape("b")
  image_spec = jax.ShapeDtypeStruct((batch, crop, crop, 3), np.float32)
  leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  exported = jax.export.export(jax.jit(inference), platforms=tuple(config.export.platforms) or None)(leaf_specs, image_spec)
  out = os.path.join(workdir, EXPORT_DIR)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "inference.jax_export"), "wb") as f:
      f.write(exported.serialize())
    np.savez(os.path.join(out, "params.npz"), *[np.asarray(x) for x in leaves])
    info = {"input_size": crop, "resize": config.data.resize, "map_size": config.eval.map_size,
            "mean": transforms.IMAGENET_MEAN.tolist(), "std": transforms.IMAGENET_STD.tolist(),
            "layout": "NHWC float32, ImageNet-normalised", "outputs": ["maps (b, S, S)", "scores (b,)"],
            "platforms": list(exported.platforms), "step": int(state.step)}
    with open(os.path.join(out, "export_info.json"), "w") as f:
      json.dump(info, f, indent=2)
    print(f"Exported the inference function ({', '.join(exported.platforms)}) to {out}")
  return out
