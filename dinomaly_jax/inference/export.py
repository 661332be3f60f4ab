"""Export of the inference function with jax.export: runs with jax + numpy alone.

Writes <workdir>/export/: inference.jax_export (StableHLO, symbolic batch size),
params.npz (the parameters, in the order the function takes them) and
export_info.json (input size, normalisation, map size, the classes and their calibrated
thresholds). The function takes images and a class index per image and returns the raw
maps and scores, the normalised ones (0 = median normal image, 1 = the class's
calibrated threshold, evaluation/calibration.py) and the decisions (score >= threshold). Load it with
`dinomaly_jax.inference.exported_model.load` (which imports nothing else of this package)
or the few lines of the README.
"""
import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.data import transforms
from dinomaly_jax.evaluation import calibration
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.training import model_state

EXPORT_DIR = "export"


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Serializes (params, images (b, crop, crop, 3), class ids (b,)) -> outputs into <workdir>/export."""
  calibrations = calibration.load(workdir)
  classes = list(calibrations)  # the pooled one last
  table = np.array([[c.threshold, c.center, c.scale] for c in calibrations.values()], np.float32)  # (C, 3)
  config = portable_config(config)
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh)
  variables = jax.device_get(model_state.variables(state))
  leaves, treedef = jax.tree.flatten(variables)
  inference = inference_function(model, config, treedef, table)
  crop = config.data.crop
  (batch,) = jax.export.symbolic_shape("b")
  image_spec = jax.ShapeDtypeStruct((batch, crop, crop, 3), np.float32)
  leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  class_spec = jax.ShapeDtypeStruct((batch,), np.int32)
  exported = jax.export.export(jax.jit(inference), platforms=tuple(config.export.platforms) or None)(
      leaf_specs, image_spec, class_spec)
  out = storage.join(workdir, EXPORT_DIR)
  if jax.process_index() == 0:
    storage.write_bytes(storage.join(out, "inference.jax_export"), exported.serialize())
    storage.buffered_writer(storage.join(out, "params.npz"),
                            lambda f: np.savez(f, *[np.asarray(x) for x in leaves]))
    info = {"input_size": crop, "resize": config.data.resize, "map_size": config.eval.map_size,
            "mean": transforms.IMAGENET_MEAN.tolist(), "std": transforms.IMAGENET_STD.tolist(),
            "layout": "NHWC float32, ImageNet-normalised",
            "inputs": ["images (b, crop, crop, 3)", "class_ids (b,) int32: positions in classes"],
            "outputs": {"maps": "(b, S, S)", "scores": "(b,)", "normalised_maps": "(b, S, S)",
                        "normalised_scores": "(b,)", "anomalous": "(b,) bool: score >= threshold"},
            "classes": classes, "pooled_class": calibration.POOLED,
            "calibration": {n: {"threshold": c.threshold, "center": c.center, "heat_range": list(c.heat_range()),
                                "source": c.source} for n, c in calibrations.items()},
            "platforms": list(exported.platforms), "step": int(state.step)}
    storage.write_text(storage.join(out, "export_info.json"), json.dumps(info, indent=2))
    print(f"Exported the inference function ({', '.join(exported.platforms)}) to {out}")
  return out


def portable_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the exported function is traced with: "xla" attention (portable, and
  traceable with a symbolic batch size)."""
  config = copy.deepcopy(config)
  config.model.attention_impl = "xla"
  return config


def inference_function(model, config, treedef, table):
  """The exported function: (parameter leaves, images (b, crop, crop, 3), class ids (b,)) ->
  raw, normalised maps and scores and decisions; table (C, 3): threshold, center, scale."""
  map_fn = evaluate.map_function(model, config)

  def inference(param_leaves, images, class_ids):
    maps, scores = map_fn(jax.tree.unflatten(treedef, param_leaves), images)  # (b, S, S), (b,)
    threshold, center, scale = jnp.asarray(table)[class_ids].T  # (b,) each
    return {"maps": maps, "scores": scores,
            "normalised_maps": (maps - center[:, None, None]) / scale[:, None, None],
            "normalised_scores": (scores - center) / scale, "anomalous": scores >= threshold}

  return inference
