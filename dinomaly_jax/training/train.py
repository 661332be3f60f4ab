"""The train loop: state, jitted step over the mesh, checkpoints, logging, evaluation,
rollbacks on loss spikes (spike_guard.py)."""
import collections
import copy
import math

import jax
import ml_collections
from tqdm import tqdm

from dinomaly_jax import sharding
from dinomaly_jax import storage
from dinomaly_jax.config import saved
from dinomaly_jax.data import few_shot
from dinomaly_jax.data import index as data_index
from dinomaly_jax.data import pipeline
from dinomaly_jax.errors import Interrupted
from dinomaly_jax.evaluation import evaluate
from dinomaly_jax.training import feature_cache
from dinomaly_jax.training import interrupt
from dinomaly_jax.training import metric_writer
from dinomaly_jax.training import model_state
from dinomaly_jax.training import optim
from dinomaly_jax.training import preflight
from dinomaly_jax.training import spike_guard
from dinomaly_jax.training import train_step
from dinomaly_jax.weights import checkpoint

MAX_STEPS_IN_FLIGHT = 2  # steps dispatched ahead of the one the host waits for


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates."""
  saved.check_compatible(workdir, config)
  records = data_index.build_records(config.data, "train")
  test_records = data_index.build_records(config.data, "test")  # fail early on bad test data
  evaluate.check_records(config, test_records)
  preflight.check_training(config, few_shot.count(records, config.data.shots, config.seed))
  mesh = sharding.make_mesh()
  model, state, _ = model_state.build(config)
  fingerprint = model_state.check_encoder(config, workdir, state)
  saved_steps = saved.load(workdir).train.steps if saved.exists_in(workdir) else config.train.steps
  saved.save(workdir, config)  # every check passed: the work directory starts here
  records = few_shot.select(records, config.data.shots, config.seed, workdir)  # <workdir>/shots.json
  checkpoint.save_encoder(workdir, fingerprint, model_state.encoder_source(config))
  state = sharding.replicate(state, mesh)
  mngr = checkpoint.manager(workdir, config)
  start = mngr.latest_step() or 0
  if start:
    state = checkpoint.restore(mngr, state, start)
    _log(f"Resumed from the checkpoint of step {start} in {workdir}.")
    if saved_steps != config.train.steps:
      _log(_longer_schedule_note(config.train, saved_steps, start))
  elif config.init_from:
    state, from_step = model_state.init_from(config, state, fingerprint)
    _log(f"Bottleneck and decoder start from step {from_step} of {config.init_from} (config.init_from); "
         f"optimizer, step and learning-rate schedule start afresh.")
  n_proc, batch = jax.process_count(), config.train.batch_size
  guard = spike_guard.SpikeGuard(config.train, workdir)
  position = start + guard.data_offset  # batches skipped by earlier rollbacks
  if config.data.cache_features:
    batches, _ = feature_cache.cached_training(
        config, model, state.encoder_params, records, mesh, start_step=position)
  else:
    batches = pipeline.train_iterator(
        records, config.data, batch_size=batch // n_proc, seed=config.seed,
        process_index=jax.process_index(), process_count=n_proc, start_step=position)
  writer = metric_writer.MetricWriter(workdir, start)
  if config.random_encoder:
    _log("NOTE: the encoder has RANDOM weights (config.random_encoder=True), not pretrained ones: "
         "expect a working pipeline, not Dinomaly's accuracy.")
  _log(f"Training {config.train.steps} steps on {len(records)} images of "
       f"{len(set(r.class_name for r in records))} classes, global batch {batch}, "
       f"{jax.device_count()} devices ({jax.devices()[0].platform}).")
  _log("Compiling the train step...")
  loop = _TrainLoop(config, workdir, model, mesh, state, mngr, guard, writer, start)
  result = {}
  device_batches = _on_device(batches, mesh)

  def evaluate_now(step: int) -> dict:  # the current state (after any rollback)
    return evaluate.evaluate(config, workdir, model, model_state.variables(loop.state), test_records,
                             step=step, mesh=mesh)

  try:
    end = config.train.steps
    if config.train.stop_after:
      end = min(end, start + config.train.stop_after)
    if 0 < start < end and _due(start, config.train.eval_every) and storage.primary_decides(
        not writer.has_eval(start)):  # due at the resumed step, never logged (killed during it, or stop_after)
      _log_eval(writer, start, evaluate_now(start))
    with interrupt.StopOnSignal() as stop:
      while loop.done < end:
        loop.step(next(device_batches))
        done = loop.done
        is_last = done == end
        is_log = done % config.train.log_every == 0
        if is_log or is_last or _due(done, config.train.checkpoint_every):
          spike = loop.flush()
          if spike is not None:  # back to the last good state; the data continues after the spike
            loop.roll_back(spike)
            continue
        if _due(done, config.train.checkpoint_every) or is_last:
          loop.save_checkpoint()
        if stop.should_stop(done, at_log_step=is_log or is_last):  # a signal in the last step stops too
          loop.stop(stop)
        if _due(done, config.train.eval_every) and not is_last:
          mngr.wait_until_finished()
          _log_eval(writer, done, evaluate_now(done))
    loop.bar.close()
    mngr.wait_until_finished()
    if end < config.train.steps:
      _log(f"Stopped after step {end} (config.train.stop_after); run again in {workdir} to resume.")
    else:
      result = evaluate_now(end)
      _log_eval(writer, end, result)
  finally:
    loop.bar.close()
    device_batches.close()  # shuts the data workers down (no leaked shared memory)
    batches.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return result


def _longer_schedule_note(t, saved_steps: int, start: int) -> str:
  """One line: the run continues to more steps, and what that does to the learning rate."""
  lr = lambda total: float(optim.warm_cosine_schedule(t.lr, t.final_lr, total, t.warmup_steps)(start))
  return (f"Training on from step {start} to train.steps={t.steps} (was {saved_steps}): the learning-rate "
          f"schedule (warm-up, cosine to train.final_lr) now spans {t.steps} steps, so step {start + 1} "
          f"trains at lr {lr(t.steps):.2e} where the {saved_steps}-step schedule gave {lr(saved_steps):.2e}.")


class _TrainLoop:
  """The loop's state between steps: the train state, the steps done and the last good
  checkpoint, the metrics not yet fetched, the steps in flight, and the step function (whose
  learning rate a rollback lowers)."""

  def __init__(self, config, workdir, model, mesh, state, mngr, guard, writer, start: int):
    self.config, self.workdir, self.model, self.mesh = config, workdir, model, mesh
    self.state, self.mngr, self.guard, self.writer = state, mngr, guard, writer
    self.done = self.last_good = start
    self.pending = []  # (step, metrics on device): fetched at log time, no sync per step
    self.in_flight = collections.deque()  # losses of the steps dispatched but maybe not yet run
    self.step_fn = _step_fn(model, config, mesh, guard.lr_scale)
    # Rollbacks before the first checkpoint return to the initial state (kept on the host).
    rollback_to_start = config.train.spike_policy == "rollback" and not start
    self.initial = jax.device_get(checkpoint.trainable(state)) if rollback_to_start else None
    self.bar = tqdm(total=config.train.steps, initial=start, disable=not storage.is_primary(),
                    dynamic_ncols=True, desc="train")

  def step(self, batch) -> None:
    """Dispatches one step; waits only for the step MAX_STEPS_IN_FLIGHT before it."""
    self.state, metrics = self.step_fn(self.state, batch)
    self.pending.append((self.done, metrics))
    self.in_flight.append(metrics["loss"])
    if len(self.in_flight) > MAX_STEPS_IN_FLIGHT:  # a signal then stops within a step or two
      self.in_flight.popleft().block_until_ready()
    self.bar.update(1)
    self.done += 1

  def flush(self) -> spike_guard.Spike | None:
    """Fetches the pending step metrics and checks them: the first spike, or logs the last one."""
    fetched = jax.device_get([m for _, m in self.pending])
    spike = self.guard.check([(step + 1, float(m["loss"])) for (step, _), m in zip(self.pending, fetched)])
    if spike is None:
      step, m = self.pending[-1][0], fetched[-1]
      self.writer.write_scalars(step + 1, m)
      self.bar.set_postfix_str(f"step {step + 1}: loss {float(m['loss']):.4f}, p {float(m['p']):.2f}, "
                               f"lr {float(m['lr']):.2e}")  # the last logged step's values
    self.pending.clear()
    return spike

  def save_checkpoint(self) -> None:
    checkpoint.check_room(self.workdir, self.state, last_step=self.last_good)
    checkpoint.save(self.mngr, self.done, self.state)
    self.last_good = self.done

  def roll_back(self, spike: spike_guard.Spike) -> None:
    """Back to the last good checkpoint with a lower learning rate (raises if not allowed)."""
    guard, done, last_good = self.guard, self.done, self.last_good
    guard.record(spike, last_good=last_good, done=done)  # raises if not allowed
    self.writer.write_scalars(spike.step, {"spike/rollbacks": len(guard.events),
                                           "spike/lr_scale": guard.lr_scale})
    _log(f"Loss spike at step {spike.step} ({spike.reason}, loss {spike.loss}): rolled back to "
         f"step {last_good}, skipping the {done - last_good} batches since, "
         f"learning rate x{guard.lr_scale:g} (rollback {len(guard.events)} of "
         f"{self.config.train.spike_max_rollbacks}).")
    self.mngr.wait_until_finished()
    self.state = (checkpoint.restore(self.mngr, self.state, last_good)
                  if last_good in self.mngr.all_steps()
                  else self.state.replace(**sharding.replicate(self.initial, self.mesh)))
    self.step_fn = _step_fn(self.model, self.config, self.mesh, guard.lr_scale)
    self.in_flight.clear()
    self.writer.drop_after(last_good)  # those steps are trained again
    self.done = last_good
    self.bar.n = last_good
    self.bar.refresh()

  def stop(self, stop: interrupt.StopOnSignal):
    """After a signal: the pending metrics logged, a checkpoint of this step, Interrupted.

    If those metrics hold a loss spike, the last good checkpoint is kept instead (the
    resumed run then meets the spike and rolls back as usual).
    """
    spike = self.flush() if self.pending else None
    if spike is None and self.last_good != self.done:
      self.save_checkpoint()
    self.mngr.wait_until_finished()
    self.bar.close()
    saved_what = ("its checkpoint is saved" if self.last_good == self.done
                  else f"the last good checkpoint is step {self.last_good}")
    raise Interrupted(
        f"{stop.signal_name}: stopped after step {self.done}; {saved_what}. Resume with: "
        f"python -m dinomaly_jax.main --workdir={self.workdir}", 128 + int(stop.signum))


def _on_device(batches, mesh, depth: int = 2):
  """Global device batches, `depth` transfers ahead of the step that consumes them."""
  queue = collections.deque()
  for local in batches:
    queue.append(sharding.global_batch(local, mesh, "train.batch_size"))
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


def _log(message: str) -> None:
  if storage.is_primary():
    print(message, flush=True)
