"""Parallel strategies: the same pure step, compiled with `jit` over a mesh or with `pmap`.

`jit` (default): a `Mesh` over all devices (of all processes) with one axis 'data'; the batch
is sharded on 'data', the state and teacher variables are replicated, the state is donated.
XLA inserts the collectives, and batch-relational losses see the global batch as is.

`pmap`: one replica per local device; means over the batch and gradients are averaged with
collectives over the axis 'batch', and relational losses `all_gather` the batch.

Both give the same numbers as a single device (up to float summation order). Multi-host: call
`jax.distributed.initialize()` first; each process feeds its own rows of the global batch.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.methods.base import BatchOps, single_device_ops

PARALLEL_KINDS = ("jit", "pmap")
PMAP_AXIS = "batch"


def check_batch_divisible(global_batch_size: int, num_devices: int, field: str):
  if global_batch_size % num_devices:
    raise ValueError(
        f"{field}={global_batch_size} is not divisible by the number of devices "
        f"({num_devices}); use a multiple of {num_devices}.")


class JitParallel:
  """`jax.jit` with NamedShardings over a 1-D 'data' mesh of every device."""
  kind = "jit"
  batch_norm_axis_name = None  # BatchNorm under jit already sees the global batch.

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.num_devices = self.mesh.size

  def put_replicated(self, tree):
    return jax.device_put(tree, self.replicated)

  def put_batch(self, local_batch: dict):
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def to_host(self, tree):
    """A replicated tree back to host numpy arrays."""
    return jax.device_get(tree)

  def compile_train_step(self, train_step: Callable) -> Callable:
    step = functools.partial(train_step, ops=single_device_ops())
    return jax.jit(step, in_shardings=(self.replicated, self.replicated, self.batch_sharding),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, eval_step: Callable) -> Callable:
    return jax.jit(eval_step, in_shardings=(self.replicated, self.replicated,
                                            self.batch_sharding),
                   out_shardings=self.replicated)

  @staticmethod
  def reduce_gradients(grads):
    return grads


def _pmap_ops() -> BatchOps:
  num_replicas = lambda: jax.lax.psum(1, PMAP_AXIS)

  def mean(values, where):
    where = where.astype(values.dtype)
    local_sum = jnp.sum(values * where)
    total = jnp.maximum(jax.lax.psum(jnp.sum(where), PMAP_AXIS), 1.0)
    # The value is the global mean, the same on every replica (so state computed from it,
    # such as TAID's schedule, cannot diverge). The gradient is that of the local sum scaled
    # by the replica count: averaging gradients over replicas (pmean) then gives the gradient
    # of the global mean; relational losses computed on the gathered batch get their exact
    # gradient the same way (all_gather's transpose sums over replicas).
    scaled_local = local_sum * num_replicas() / total
    global_mean = jax.lax.psum(jax.lax.stop_gradient(local_sum), PMAP_AXIS) / total
    return scaled_local + jax.lax.stop_gradient(global_mean - scaled_local)

  gather = lambda x: jax.lax.all_gather(x, PMAP_AXIS, tiled=True)
  return BatchOps(mean=mean, gather=gather)


class PmapParallel:
  """`jax.pmap` over local devices, collectives over the axis 'batch'."""
  kind = "pmap"
  batch_norm_axis_name = PMAP_AXIS

  def __init__(self):
    self.devices = jax.local_devices()
    self.num_local_devices = len(self.devices)
    self.num_devices = jax.device_count()

  def put_replicated(self, tree):
    stacked = jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (self.num_local_devices,) + np.shape(x)), tree)
    # One identity pmap lays every leaf out one copy per device, so later steps don't
    # re-transfer host arrays.
    return jax.pmap(lambda t: t)(stacked)

  def put_batch(self, local_batch: dict):
    def split(x):
      x = np.asarray(x)
      return x.reshape((self.num_local_devices, -1) + x.shape[1:])
    return {k: split(v) for k, v in local_batch.items()}

  def to_host(self, tree):
    return jax.tree.map(first_local_replica, tree)

  def compile_train_step(self, train_step: Callable) -> Callable:
    step = functools.partial(train_step, ops=_pmap_ops())

    def replicated_step(state, teacher_variables, batch):
      new_state, metrics = step(state, teacher_variables, batch)
      return new_state, jax.lax.pmean(metrics, PMAP_AXIS)

    return jax.pmap(replicated_step, axis_name=PMAP_AXIS,
                    donate_argnums=(0,))

  def compile_eval_step(self, eval_step: Callable) -> Callable:
    def summed(state, teacher_variables, batch):
      return jax.lax.psum(eval_step(state, teacher_variables, batch), PMAP_AXIS)
    return jax.pmap(summed, axis_name=PMAP_AXIS)

  @staticmethod
  def reduce_gradients(grads):
    return jax.lax.pmean(grads, PMAP_AXIS)


def first_local_replica(x) -> np.ndarray:
  """Replica 0 of a pmapped array, read from this process's devices only (`x[0]` would
  address a global, multi-host array)."""
  shard = np.asarray(x.addressable_shards[0].data)
  return shard[0] if shard.ndim == x.ndim else shard


def get_parallel(kind: str):
  if kind == "jit":
    return JitParallel()
  if kind == "pmap":
    return PmapParallel()
  raise ValueError(f"config.parallel={kind!r} is not valid; choose one of {PARALLEL_KINDS}.")


def metrics_to_host(parallel, metrics) -> dict:
  """Device metrics (replicated) to Python floats."""
  if parallel.kind == "pmap":
    return {k: float(first_local_replica(v)) for k, v in metrics.items()}
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
