"""Runs one mode of the main job (train, eval, predict, export) for a config.

The entry layer: it validates the config, starts the multi-host runtime, and calls
the stages (training, evaluation, inference); nothing below imports it.
"""
import copy
import os

import jax
import ml_collections

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.config import saved
from dinomaly_jax.config import validation
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import synthetic
from dinomaly_jax.errors import ConfigError
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.evaluation import html_report
from dinomaly_jax.evaluation import report
from dinomaly_jax.inference import export
from dinomaly_jax.inference import predict
from dinomaly_jax.inference import submission
from dinomaly_jax.training import model_state
from dinomaly_jax.training import preflight
from dinomaly_jax.training import train
from dinomaly_jax.weights import checkpoint
from dinomaly_jax.weights import encoder_weights


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validation.validate(config)  # every field; the model's size may still be "auto"
  encoder_weights.resolve_architecture(config)  # "auto" read from the weights' meta.json
  validation.validate(config)  # the model fields the weights filled in
  sharding.maybe_initialize_distributed()
  if config.mode in ("train", "eval") and config.data.synthetic:
    _use_demo_data(config, workdir)
  if config.mode == "train":
    if config.data.class_separated:
      return _per_class(config, workdir, train.train)
    return train.train(config, workdir)
  if config.mode == "eval":
    if config.data.class_separated:
      return _per_class(config, workdir, evaluate_workdir)
    return evaluate_workdir(config, workdir)
  if config.mode in ("predict", "export", "submit") and jax.process_count() > 1:
    raise ConfigError(
        f"config.mode={config.mode!r} runs on one process; start it without the multi-host "
        "environment (it uses this host's devices).")
  if config.mode == "predict":
    return predict.predict(config, workdir)
  if config.mode == "submit":
    return submission.write_submission(config, workdir)
  return export.export(config, workdir)


def evaluate_workdir(config, workdir, step: int | None = None) -> dict:
  """Eval mode: restores the latest (or given) checkpoint of `workdir` and evaluates it."""
  records = data_index.build_records(config.data, "test")
  preflight.check_evaluation(config)
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh, step)
  if not saved.exists_in(workdir):  # a new work directory (a converted reference model) starts here
    checkpoint.save_config(workdir, config)
  return evaluate.evaluate(config, workdir, model, model_state.variables(state), records,
                           step=int(state.step), mesh=mesh)


def _use_demo_data(config, workdir) -> None:
  """Generates the demo dataset once on each host's own disk, and points data.root at it:
  <workdir>/demo_data for a local work directory, else the host's cache folder."""
  root = (os.path.join(storage.local_cache_dir(), f"demo_data_seed{config.seed}")
          if storage.is_url(workdir) else os.path.join(workdir, "demo_data"))
  if not os.path.isdir(root) and jax.process_index() == 0:
    print(f"Generating the demo dataset in {root} ...", flush=True)
  config.data.root = storage.make_local_once(root, lambda tmp: synthetic.generate(tmp, seed=config.seed))


def _per_class(config, workdir, fn) -> dict:
  """Class-separated protocol: one model per class in <workdir>/<class>, one combined report."""
  per_class, inspection = {}, {}
  for name in data_index.list_classes(config.data):
    c = copy.deepcopy(config)
    c.data.classes = (name,)
    result = fn(c, storage.join(workdir, name))
    if jax.process_index() == 0:
      per_class[name] = result["classes"][name]
      inspection[name] = result["inspection"][name]
  if jax.process_index() != 0:
    return {}
  out_dir = storage.join(workdir, "eval")
  result = report.write_report(out_dir, per_class, dataset=config.data.layout,
                               extra={"random_encoder": bool(config.random_encoder)}, inspection=inspection)
  html_report.write(out_dir, result, [])  # the tables; each class's pictures are in its own report
  return result
