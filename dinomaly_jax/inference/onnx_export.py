"""ONNX and OpenVINO files of the inference function (config.export.format "onnx", "openvino").

Route: jax2onnx (PyPI) converts the jaxpr of the same function the jax.export artefact
holds (model -> maps -> scores -> calibration table) to ONNX, opset 23, with a symbolic
batch dimension "B"; the parameters become initializers. It is a maintained converter that
reads JAX itself, so no second framework (TensorFlow for tf2onnx, torch) is involved.
OpenVINO reads the ONNX file (`openvino.convert_model`) and writes its IR (model.xml and
model.bin) with float32 weights (`ov.save_model` would halve them to float16 by default).

Inputs: images (B, crop, crop, 3) float32 NHWC, ImageNet-normalised; class_ids (B,) int32,
positions in export_info.json's "classes". Outputs: maps, scores, normalised_maps,
normalised_scores, anomalous (bool). `onnx_predictor.py` runs the file without JAX.
"""
import contextlib
import logging
import subprocess
import sys
import tempfile

import jax
import numpy as np

from dinomaly_jax import storage
from dinomaly_jax.errors import ConfigError

OUTPUTS = ("maps", "scores", "normalised_maps", "normalised_scores", "anomalous")
INPUTS = ("images", "class_ids")
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # and model.bin beside it
OPSET = 23


def onnx_model(inference, crop: int) -> bytes:
  """inference(images, class_ids) -> dict of OUTPUTS, to a serialized ONNX model with batch "B"."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("config.export.format: 'onnx' and 'openvino' need jax2onnx; install the "
                      "deploy extra and `pip install --no-deps jax2onnx==0.17.1` (README, Deploy).") from None

  def as_tuple(images, class_ids):
    outputs = inference(images, class_ids)
    return tuple(outputs[k] for k in OUTPUTS)

  specs = [jax.ShapeDtypeStruct(("B", crop, crop, 3), np.float32), jax.ShapeDtypeStruct(("B",), np.int32)]
  with _quiet("jax2onnx", "onnx_ir"):  # its optional plugins' import errors, untyped shape values
    proto = jax2onnx.to_onnx(as_tuple, inputs=specs, model_name="dinomaly", opset=OPSET,
                             input_names=list(INPUTS), output_names=list(OUTPUTS))
  return proto.SerializeToString()


@contextlib.contextmanager
def _quiet(*loggers):
  """Only errors from these loggers while the block runs."""
  saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
  for logger, _ in saved:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in saved:
      logger.setLevel(level)


def write_openvino(onnx_bytes: bytes, out_dir: str) -> list[str]:
  """The OpenVINO IR (float32) of an ONNX model into out_dir (local or URL); returns the paths.

  Converted in a child Python: OpenVINO's converter forks, which JAX warns may deadlock a
  process that has started JAX's threads.
  """
  with tempfile.TemporaryDirectory() as tmp:
    onnx_path, ir_dir = storage.join(tmp, ONNX_FILE), storage.join(tmp, "ir")
    storage.write_bytes(onnx_path, onnx_bytes)  # this host's temporary copy
    proc = subprocess.run([sys.executable, "-c", _CONVERT, onnx_path, storage.join(ir_dir, OPENVINO_FILE)],
                          capture_output=True, text=True, check=False)
    if proc.returncode == _NO_OPENVINO:
      raise ConfigError("config.export.format='openvino' needs openvino: install the deploy extra "
                        "(pip install -e '.[deploy]').")
    if proc.returncode:
      raise RuntimeError(f"OpenVINO could not convert the ONNX model:\n{proc.stderr[-3000:]}")
    names = storage.listdir(ir_dir)
    for name in names:
      storage.write_shared(storage.join(out_dir, name), storage.read_bytes(storage.join(ir_dir, name)))
    return [storage.join(out_dir, name) for name in names]


_NO_OPENVINO = 3
_CONVERT = f"""import sys
try:
  import openvino as ov
except ImportError:
  sys.exit({_NO_OPENVINO})
ov.save_model(ov.convert_model(sys.argv[1]), sys.argv[2], compress_to_fp16=False)  # float32 weights
"""
