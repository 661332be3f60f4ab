"""Runs one mode of the main job for a validated config."""
import copy
import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from dinomaly_jax import config_validation
from dinomaly_jax import sharding


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_validation.validate(config)
  sharding.maybe_initialize_distributed()
  if config.mode in ("train", "eval") and config.data.synthetic:
    _use_demo_data(config, workdir)
  if config.mode == "train":
    from dinomaly_jax import train  # pylint: disable=g-import-not-at-top
    if config.data.class_separated:
      return _per_class(config, workdir, train.train)
    return train.train(config, workdir)
  if config.mode == "eval":
    from dinomaly_jax import evaluate  # pylint: disable=g-import-not-at-top
    if config.data.class_separated:
      return _per_class(config, workdir, evaluate.evaluate_workdir)
    return evaluate.evaluate_workdir(config, workdir)
  if config.mode in ("predict", "export") and jax.process_count() > 1:
    raise config_validation.ConfigError(
        f"config.mode={config.mode!r} runs on one process; start it without the multi-host "
        "environment (it uses this host's devices).")
  if config.mode == "predict":
    from dinomaly_jax import predict  # pylint: disable=g-import-not-at-top
    return predict.predict(config, workdir)
  from dinomaly_jax import export  # pylint: disable=g-import-not-at-top
  return export.export(config, workdir)


def _use_demo_data(config, workdir) -> None:
  """Generates the demo dataset into <workdir>/demo_data once, and points data.root at it."""
  from dinomaly_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "demo_data")
  if jax.process_index() == 0 and not os.path.exists(os.path.join(root, ".complete")):
    print(f"Generating the demo dataset in {root} ...", flush=True)
    synthetic.generate(root, seed=config.seed)
    open(os.path.join(root, ".complete"), "w").close()
  multihost_utils.sync_global_devices("demo_data")
  config.data.root = root


def _per_class(config, workdir, fn) -> dict:
  """Class-separated protocol: one model per class in <workdir>/<class>, one combined report."""
  from dinomaly_jax import report  # pylint: disable=g-import-not-at-top
  from dinomaly_jax.data import index as data_index  # pylint: disable=g-import-not-at-top
  per_class = {}
  for name in data_index.list_classes(config.data):
    c = copy.deepcopy(config)
    c.data.classes = (name,)
    result = fn(c, os.path.join(workdir, name))
    if jax.process_index() == 0:
      per_class[name] = result["classes"][name]
  if jax.process_index() != 0:
    return {}
  return report.write_report(os.path.join(workdir, "eval"), per_class, dataset=config.data.layout,
                             extra={"random_encoder": bool(config.random_encoder)})
