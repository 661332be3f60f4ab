"""Runs one mode of the main job (train, eval, predict, export, compile) for a config.

The entry layer: it validates the config, starts the multi-host runtime, and calls
the stages (training, evaluation, inference); nothing below imports it.
"""
import copy

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
from dinomaly_jax.planning import slice_compile
from dinomaly_jax.inference import submission
from dinomaly_jax.training import model_state
from dinomaly_jax.training import train
from dinomaly_jax.weights import encoder_weights


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validation.validate(config)  # every field; the model's size may still be "auto"
  if config.mode != "compile":  # the compile mode runs on this machine alone, for the slice it names
    # Before anything starts JAX's backends (converting a .pth does): each host then converts
    # the weights into its own cache, as one process among others.
    sharding.maybe_initialize_distributed()
  encoder_weights.resolve_architecture(config)  # "auto" read from the weights' meta.json
  validation.validate(config)  # the model fields the weights filled in
  if config.mode == "compile":
    return slice_compile.compile_for_slice(config, workdir)
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
  if config.mode == "submit" and jax.process_count() > 1:
    raise ConfigError("config.mode='submit' runs on one process; start it without the multi-host "
                      "environment (it uses this host's devices).")
  if config.mode == "predict":
    return predict.predict(config, workdir)
  if config.mode == "submit":
    return submission.write_submission(config, workdir)
  return export.export(config, workdir)


def evaluate_workdir(config, workdir, step: int | None = None) -> dict:
  """Eval mode: restores the latest (or given) checkpoint of `workdir` and evaluates it."""
  records = data_index.build_records(config.data, "test")
  evaluate.check_records(config, records)
  evaluate.check_inputs(config)
  mesh = sharding.make_mesh()
  model, state = model_state.load_trained(config, workdir, mesh, step)
  # A new work directory (a converted reference model) starts here; one answer for every host.
  if not storage.primary_decides(saved.exists_in(workdir)):
    saved.save(workdir, config)
  return evaluate.evaluate(config, workdir, model, model_state.variables(state), records,
                           step=int(state.step), mesh=mesh)


def _use_demo_data(config, workdir) -> None:
  """Generates the demo dataset once on each host's own disk, and points data.root at it:
  <workdir>/demo_data for a local work directory, else the host's cache folder."""
  root = (storage.join(storage.local_cache_dir(), f"demo_data_seed{config.seed}")
          if storage.is_url(workdir) else storage.join(workdir, "demo_data"))
  if not storage.isdir(root) and storage.is_primary():
    print(f"Generating the demo dataset in {root} ...", flush=True)
  config.data.root = storage.make_local_once(root, lambda tmp: synthetic.generate(tmp, seed=config.seed))


def _per_class(config, workdir, fn) -> dict:
  """Class-separated protocol: one model per class in <workdir>/<class>, one combined report."""
  per_class, inspection = {}, {}
  for name in data_index.list_classes(config.data):
    c = copy.deepcopy(config)
    c.data.classes = (name,)
    result = fn(c, storage.join(workdir, name))
    if storage.is_primary() and result:  # {} from a normal-only run
      per_class[name] = result["classes"][name]
      inspection[name] = result["inspection"][name]
  if not storage.is_primary() or not per_class:
    return {}
  out_dir = storage.join(workdir, "eval")
  result = report.write_report(out_dir, per_class, dataset=config.data.layout,
                               extra={"random_encoder": bool(config.random_encoder)}, inspection=inspection)
  html_report.write(out_dir, result, [])  # the tables; each class's pictures are in its own report
  return result
