"""Export of the inference function with jax.export: runs with jax + numpy alone.

Writes <workdir>/export/: inference.jax_export (StableHLO, symbolic batch size),
params.npz (the parameters, in the order the function takes them) and
export_info.json (input size, normalisation, map size, the classes and their calibrated
thresholds). The function takes images and a class index per image and returns the raw
maps and scores, the normalised ones (0 = median normal image, 1 = the class's
calibrated threshold, evaluation/calibration.py) and the decisions (score >= threshold). Load it with
`dinomaly_jax.inference.exported_model.load` (which imports nothing else of this package)
or the few lines of the README.

config.export.format picks the file: "jax" (the above), "onnx" (model.onnx, the same
function with the parameters inside, for ONNX Runtime) or "openvino" (model.onnx and
OpenVINO's model.xml/.bin), see onnx_export.py; export_info.json is written for each.
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
from dinomaly_jax.inference import onnx_export
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
  inference = inference_function(evaluate.map_function(model, config), treedef, table)
  crop, fmt = config.data.crop, config.export.format
  out = storage.join(workdir, EXPORT_DIR)
  if fmt == "jax":
    written, extra = _write_jax(inference, leaves, crop, config.export.platforms, out)
  else:
    written, extra = _write_onnx(lambda images, ids: inference(leaves, images, ids), crop, fmt, out)
  info = {"input_size": crop, "resize": config.data.resize, "map_size": config.eval.map_size,
          "bit_depth": int(config.data.bit_depth),  # of 16-bit grayscale inputs; 0 = from each file
          "mean": transforms.IMAGENET_MEAN.tolist(), "std": transforms.IMAGENET_STD.tolist(),
          "layout": "NHWC float32, ImageNet-normalised",
          "inputs": ["images (b, crop, crop, 3)", "class_ids (b,) int32: positions in classes"],
          "outputs": {"maps": "(b, S, S)", "scores": "(b,)", "normalised_maps": "(b, S, S)",
                      "normalised_scores": "(b,)", "anomalous": "(b,) bool: score >= threshold"},
          "classes": classes, "pooled_class": calibration.POOLED,
          "calibration": {n: {"threshold": c.threshold, "center": c.center, "heat_range": list(c.heat_range()),
                              "source": c.source} for n, c in calibrations.items()},
          **extra, "step": int(state.step)}
  storage.write_shared(storage.join(out, "export_info.json"), json.dumps(info, indent=2))
  if storage.is_primary():
    print(f"Exported the inference function ({fmt}) to {', '.join(written)}")
  return out


def portable_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the exported function is traced with: "xla" attention (plain products and
  softmax in every runtime, traceable with a symbolic batch size)."""
  config = copy.deepcopy(config)
  config.model.attention_impl = "xla"
  return config


def inference_function(map_fn, treedef, table: np.ndarray):
  """(parameter leaves, images (b, crop, crop, 3), class ids (b,)) -> the exported outputs.

  table: (C, 3) float32 rows of (threshold, center, scale) per class id.
  """

  def inference(param_leaves, images, class_ids):
    maps, scores = map_fn(jax.tree.unflatten(treedef, param_leaves), images)  # (b, S, S), (b,)
    threshold, center, scale = jnp.asarray(table)[class_ids].T  # (b,) each
    return {"maps": maps, "scores": scores,
            "normalised_maps": (maps - center[:, None, None]) / scale[:, None, None],
            "normalised_scores": (scores - center) / scale, "anomalous": scores >= threshold}

  return inference


def _write_jax(inference, leaves, crop: int, platforms, out: str) -> tuple[list[str], dict]:
  """inference.jax_export (symbolic batch "b") and params.npz; (paths, export_info fields)."""
  (batch,) = jax.export.symbolic_shape("b")
  image_spec = jax.ShapeDtypeStruct((batch, crop, crop, 3), np.float32)
  leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  class_spec = jax.ShapeDtypeStruct((batch,), np.int32)
  exported = jax.export.export(jax.jit(inference), platforms=tuple(platforms) or None)(
      leaf_specs, image_spec, class_spec)
  paths = [storage.join(out, "inference.jax_export"), storage.join(out, "params.npz")]
  storage.write_shared(paths[0], exported.serialize())
  storage.write_shared_with(paths[1], lambda f: np.savez(f, *[np.asarray(x) for x in leaves]))
  return paths, {"format": "jax", "platforms": list(exported.platforms)}


def _write_onnx(inference, crop: int, fmt: str, out: str) -> tuple[list[str], dict]:
  """model.onnx (batch "B", parameters inside) and for "openvino" its IR; (paths, info fields)."""
  model_bytes = onnx_export.onnx_model(inference, crop)
  paths = [storage.join(out, onnx_export.ONNX_FILE)]
  storage.write_shared(paths[0], model_bytes)
  if fmt == "openvino":
    paths += onnx_export.write_openvino(model_bytes, out)
  return paths, {"format": fmt, "onnx_inputs": list(onnx_export.INPUTS),
                 "onnx_outputs": list(onnx_export.OUTPUTS)}
