"""The train loop: state, jitted step over the mesh, checkpoints, logging, evaluation,
rollbacks on loss spikes (spike_guard.py)."""
import collections
import copy
import math

import jax
import ml_collections
from tqdm import tqdm

from dinomaly_jax import sharding
from dinomaly_jax.data import few_shot
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import pipeline
from dinomaly_jax.errors import Interrupted
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import interrupt
from dinomaly_jax.training import metric_writer
from dinomaly_jax.training import model_state
from dinomaly_jax.training import preflight
from dinomaly_jax.training import spike_guard
from dinomaly_jax.training import train_step
from dinomaly_jax.weights import checkpoint

MAX_STEPS_IN_FLIGHT = 2  # steps dispatched ahead of the one the host waits for


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates."""
  checkpoint.check_compatible(workdir, config)
  records = data_index.build_records(config.data, "train")
  test_records = data_index.build_records(config.data, "test")  # fail early on bad test data
  preflight.check_training(config, few_shot.count(records, config.data.shots, config.seed))
  mesh = sharding.make_mesh()
  model, state, _ = model_state.build(config)
  fingerprint = model_state.check_encoder(config, workdir, state)
  checkpoint.save_config(workdir, config)  # every check passed: the work directory starts here
  records = few_shot.select(records, config.data.shots, config.seed, workdir)  # <workdir>/shots.json
  checkpoint.save_encoder(workdir, fingerprint, model_state.encoder_source(config))
  state = sharding.replicate(state, mesh)
  mngr = checkpoint.manager(workdir, config)
  start = mngr.latest_step() or 0
  if start:
    state = checkpoint.restore(mngr, state, start)
    _log(f"Resumed from the checkpoint of step {start} in {workdir}.")
  n_proc, batch = jax.process_count(), config.train.batch_size
  guard = spike_guard.SpikeGuard(config.train, workdir, write=jax.process_index() == 0)
  position = start + guard.data_offset  # batches skipped by earlier rollbacks
  if config.data.cache_features:
    batches, _ = feature_cache.cached_training(
        config, model, state.encoder_params, records, mesh, start_step=position)
  else:
    batches = pipeline.train_iterator(
        records, config.data, batch_size=batch // n_proc, seed=config.seed,
        process_index=jax.process_index(), process_count=n_proc, start_step=position)
  step_fn = _step_fn(model, config, mesh, guard.lr_scale)
  # Rollbacks before the first checkpoint return to the initial state (kept on the host).
  rollback_to_start = config.train.spike_policy == "rollback" and not start
  initial = jax.device_get(checkpoint.trainable(state)) if rollback_to_start else None
  writer = metric_writer.MetricWriter(workdir)
  if config.random_encoder:
    _log("NOTE: the encoder has RANDOM weights (config.random_encoder=True), not pretrained ones: "
         "expect a working pipeline, not Dinomaly's accuracy.")
  _log(f"Training {config.train.steps} steps on {len(records)} images of "
       f"{len(set(r.class_name for r in records))} classes, global batch {batch}, "
       f"{jax.device_count()} devices ({jax.devices()[0].platform}).")
  result = {}
  pending = []  # (step, metrics on device): fetched at log time, no sync per step
  _log("Compiling the train step...")
  bar = tqdm(total=config.train.steps, initial=start, disable=jax.process_index() != 0,
             dynamic_ncols=True, desc="train")
  last_good_checkpoint = start
  device_batches = _on_device(batches, mesh)
  in_flight = collections.deque()  # losses of the steps dispatched but maybe not yet run
  try:
    end = config.train.steps
    if config.train.stop_after:
      end = min(end, start + config.train.stop_after)
    with interrupt.StopOnSignal() as stop:
      done = start
      while done < end:
        state, metrics = step_fn(state, next(device_batches))
        pending.append((done, metrics))
        in_flight.append(metrics["loss"])
        if len(in_flight) > MAX_STEPS_IN_FLIGHT:  # a signal then stops within a step or two
          in_flight.popleft().block_until_ready()
        bar.update(1)
        done += 1
        is_last = done == end
        is_log = done % config.train.log_every == 0
        if is_log or is_last or _due(done, config.train.checkpoint_every):
          spike = _flush(pending, writer, bar, guard)
          if spike is not None:  # back to the last good state; the data continues after the spike
            guard.record(spike, last_good=last_good_checkpoint, done=done)  # raises if not allowed
            writer.write_scalars(spike.step, {"spike/rollbacks": len(guard.events),
                                              "spike/lr_scale": guard.lr_scale})
            _log(f"Loss spike at step {spike.step} ({spike.reason}, loss {spike.loss}): rolled back to "
                 f"step {last_good_checkpoint}, skipping the {done - last_good_checkpoint} batches since, "
                 f"learning rate x{guard.lr_scale:g} (rollback {len(guard.events)} of "
                 f"{config.train.spike_max_rollbacks}).")
            mngr.wait_until_finished()
            state = (checkpoint.restore(mngr, state, last_good_checkpoint)
                     if last_good_checkpoint in mngr.all_steps()
                     else state.replace(**sharding.replicate(initial, mesh)))
            step_fn = _step_fn(model, config, mesh, guard.lr_scale)
            in_flight.clear()
            done = last_good_checkpoint
            bar.n = done
            bar.refresh()
            continue
        if _due(done, config.train.checkpoint_every) or is_last:
          checkpoint.save(mngr, done, state)
          last_good_checkpoint = done
        if not is_last and stop.should_stop(done, at_log_step=is_log):
          _stop(stop, done, state, mngr, pending, writer, bar, guard, last_good_checkpoint, workdir)
        if _due(done, config.train.eval_every) and not is_last:
          mngr.wait_until_finished()
          _log_eval(writer, done, evaluate.evaluate(config, workdir, model, model_state.variables(state),
                                                    test_records, step=done, mesh=mesh))
    bar.close()
    mngr.wait_until_finished()
    if end < config.train.steps:
      _log(f"Stopped after step {end} (config.train.stop_after); run again in {workdir} to resume.")
    else:
      result = evaluate.evaluate(config, workdir, model, model_state.variables(state), test_records,
                                 step=end, mesh=mesh)
      _log_eval(writer, end, result)
  finally:
    bar.close()
    device_batches.close()  # shuts the data workers down (no leaked shared memory)
    batches.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return result


def _stop(stop, done, state, mngr, pending, writer, bar, guard, last_good_checkpoint, workdir):
  """After a signal: the pending metrics logged, a checkpoint of step `done`, Interrupted.

  If those metrics hold a loss spike, the last good checkpoint is kept instead (the
  resumed run then meets the spike and rolls back as usual).
  """
  spike = _flush(pending, writer, bar, guard) if pending else None
  if spike is None and last_good_checkpoint != done:
    checkpoint.save(mngr, done, state)
    last_good_checkpoint = done
  mngr.wait_until_finished()
  bar.close()
  saved = ("its checkpoint is saved" if last_good_checkpoint == done
           else f"the last good checkpoint is step {last_good_checkpoint}")
  raise Interrupted(
      f"{stop.signal_name}: stopped after step {done}; {saved}. Resume with: "
      f"python -m dinomaly_jax.main --workdir={workdir}", 128 + int(stop.signum))


def _on_device(batches, mesh, depth: int = 2):
  """Global device batches, `depth` transfers ahead of the step that consumes them."""
  queue = collections.deque()
  for local in batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) == depth:
      yield queue.popleft()


def _log_eval(writer, step: int, result: dict) -> None:
  """The mean of each metric over classes, as eval/<metric> scalars (process 0)."""
  means = result.get("mean", {})
  writer.write_scalars(step, {f"eval/{k}": v for k, v in means.items() if math.isfinite(v)})


def _due(done: int, every: int) -> bool:
  return every > 0 and done % every == 0


def _step_fn(model, config, mesh, lr_scale: float):
  """The jitted train step, its learning rates scaled by lr_scale (after spike rollbacks)."""
  if lr_scale != 1:
    config = copy.deepcopy(config)
    config.train.lr *= lr_scale
    config.train.final_lr *= lr_scale
    config.train.bottleneck_first_lr *= lr_scale
  if config.data.cache_features:
    return feature_cache.make_cached_step(model, config, mesh)
  return train_step.make_train_step(model, config, mesh)


def _flush(pending, writer, bar, guard) -> spike_guard.Spike | None:
  """Fetches the pending step metrics and checks them: the first spike, or logs the last one."""
  fetched = jax.device_get([m for _, m in pending])
  spike = guard.check([(step + 1, float(m["loss"])) for (step, _), m in zip(pending, fetched)])
  if spike is None:
    step, m = pending[-1][0], fetched[-1]
    writer.write_scalars(step + 1, m)
    bar.set_postfix_str(f"step {step + 1}: loss {float(m['loss']):.4f}, p {float(m['p']):.2f}, "
                        f"lr {float(m['lr']):.2e}")  # the last logged step's values
  pending.clear()
  return spike


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
