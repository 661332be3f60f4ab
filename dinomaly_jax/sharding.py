"""Data-parallel mesh, shardings, host-local -> global arrays, multi-host start-up.

One mesh axis, "data", over every device of every process: the batch is split on
it, parameters and optimizer state are replicated. The same code runs on one CPU,
several GPUs or a TPU pod slice.
"""
import os
import pickle
from typing import Any, Optional, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from dinomaly_jax import storage
from dinomaly_jax.errors import ConfigError

DATA_AXIS = "data"


def check_batch(field: str, batch: int, process_count: int, local_devices: int) -> None:
  """A global batch (config.<field>) must split evenly over processes, and each share over
  the process's local devices."""
  per_process = batch // process_count
  if batch % process_count or per_process % local_devices:
    unit = process_count * local_devices
    raise ConfigError(
        f"config.{field}={batch} must be a multiple of {unit} ({process_count} processes x "
        f"{local_devices} devices per process) so that every device gets the same number of "
        f"images; use e.g. {max(unit, batch // unit * unit)}.")


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes several processes.

  Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (explicit),
  SLURM (SLURM_NTASKS > 1), OpenMPI (OMPI_COMM_WORLD_SIZE > 1) and multi-host Cloud
  TPU (TPU_WORKER_HOSTNAMES with several hosts). Must run before any other JAX call.
  Returns whether it initialised.
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all "
                       "three to start a multi-process run.")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
    return True
  several = (int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
  if several:
    jax.distributed.initialize()  # the cluster is detected from the environment
  return several


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh, batch_field: str):
  """Pytree (dict) of this process's numpy arrays -> global jax.Arrays split on "data".

  Every process passes its own rows; the global batch is their concatenation in
  process order. The local batch must split evenly over the local devices; the error
  names `batch_field`, the config field that sets the running mode's batch ("eval.batch_size").
  """
  local_devices = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
  sharding = data_sharding(mesh)

  def to_global(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(f"batch array of shape {x.shape}: the per-process batch (leading axis) "
                       f"must be a multiple of the {local_devices} local devices; adjust "
                       f"config.{batch_field}.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(to_global, local_batch)


def replicate(tree, mesh: Mesh):
  """Pytree of arrays, equal on every process -> global arrays replicated on `mesh`."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def local_mesh(mesh: Mesh) -> Mesh:
  """The 1-D "data" mesh over this process's devices of `mesh` (`mesh` itself on one process)."""
  if jax.process_count() == 1:
    return mesh
  return make_mesh([d for d in mesh.devices.flat if d.process_index == jax.process_index()])


def to_local(tree, mesh: Mesh):
  """Replicated global arrays -> the same values replicated on `mesh` (this process's devices)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), replicated(mesh)), tree)


def gather_objects(obj) -> list:
  """Every process's `obj` (picklable), in process order, on every process. Processes may
  arrive far apart (a coordination barrier first); for small results, not arrays of maps."""
  if jax.process_count() == 1:
    return [obj]
  storage.barrier("gather_objects")
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))  # (P,)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)  # (P, max size)
  return [pickle.loads(row[:int(n)].tobytes()) for row, n in zip(gathered, sizes.ravel())]
