"""Parallel strategies: the same pure step, compiled with `jit` over a mesh or with `pmap`.

`jit` (default): a `Mesh` over all devices (of all processes) with one axis 'data'; the batch
is sharded on 'data', the state and teacher variables are replicated, the state is donated.
XLA inserts the collectives, and batch-relational losses see the global batch as is.

`jit_2d` / `jit_2d_fsdp`: a 2-D mesh ('data', 'model') of the shape `config.mesh` gives
('data=2,model=4'); the batch is sharded on 'data' and the teacher's parameters on 'model' by
the name rules of `sharding_rules.py` (Megatron-style column/row splits); `jit_2d_fsdp` splits
the student's parameters and optimizer state by the same rules (the rest of the state stays
replicated): FSDP-like in memory, though the split is tensor-parallel on 'model', not ZeRO's
over 'data'. Per device a teacher then holds about 1/model of its parameter bytes.

`pmap`: one replica per local device; means over the batch and gradients are averaged with
collectives over the axis 'batch', and relational losses `all_gather` the batch.

Both give the same numbers as a single device (up to float summation order). Multi-host: call
`jax.distributed.initialize()` first; each process feeds its own rows of the global batch.
"""

import functools
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kdjax.methods.base import BatchOps, single_device_ops
from kdjax.train.config_syntax import MESH_AXES, PARALLEL_KINDS, mesh_shape
from kdjax.train import sharding_rules

PMAP_AXIS = "batch"


def check_batch_divisible(global_batch_size: int, num_devices: int, field: str):
  if global_batch_size % num_devices:
    raise ValueError(
        f"{field}={global_batch_size} is not divisible by the number of devices "
        f"({num_devices}); use a multiple of {num_devices}.")


def _batch_made_inside(step: Callable, make_batch: Callable, batch_sharding) -> Callable:
  """`step(state, teacher_variables, batch)` taking instead the references from which
  `make_batch(refs)` computes the batch on the devices (`kdjax.data.device_batches`)."""

  def step_on_refs(state, teacher_variables, refs):
    batch = jax.lax.with_sharding_constraint(make_batch(refs), batch_sharding)
    return step(state, teacher_variables, batch)
  return step_on_refs


def repeat_step(step_on_refs: Callable, num_steps: int) -> Callable:
  """`num_steps` consecutive steps in one program (`lax.scan`): steps refs['step'],
  refs['step'] + 1, ... each making its own batch from the references. Returns the last
  state and each step's metrics stacked on a leading axis [num_steps].

  For a step shorter than the host's work per call (Python, dispatch, the step number's
  transfer: the quickstart's 0.2 ms step on a GPU), one call per `num_steps` steps divides
  that work by `num_steps`. The steps compute what as many separate calls would (the same
  batches, the same rng folds of the state's step counter), up to float rounding: XLA fuses
  the loop body differently.
  """

  def steps(state, teacher_variables, refs):
    def body(state, offset):
      return step_on_refs(state, teacher_variables, dict(refs, step=refs["step"] + offset))
    return jax.lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32))
  return steps


def _step_for_compile(train_step: Callable, ops: BatchOps, make_batch: Optional[Callable],
                      steps_per_call: int, batch_sharding, replicated):
  """(the function to jit, the sharding of its third argument) for `compile_train_step`."""
  step = functools.partial(train_step, ops=ops)
  if make_batch is None:
    if steps_per_call != 1:
      raise ValueError(f"steps_per_call={steps_per_call} needs batches made on the devices "
                       "(config.device_batches=True).")
    return step, batch_sharding
  step = _batch_made_inside(step, make_batch, batch_sharding)
  return (repeat_step(step, steps_per_call) if steps_per_call != 1 else step), replicated


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
    if jax.process_count() == 1:
      # One transfer call for the whole batch: half the host time of an array at a time,
      # which a 1 ms step notices (the quickstart's).
      return jax.device_put(local_batch, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def to_host(self, tree):
    """A replicated tree back to host numpy arrays."""
    return jax.device_get(tree)

  def compile_train_step(self, train_step: Callable, make_batch: Optional[Callable] = None,
                         steps_per_call: int = 1) -> Callable:
    """The jitted step; with `make_batch`, the step's third argument is the references the
    batch is made from on the devices (`DeviceBatches.refs`), not a batch, and with
    `steps_per_call` > 1 one call runs that many steps (`repeat_step`: the metrics come
    stacked, [steps_per_call])."""
    step, batch_sharding = _step_for_compile(train_step, single_device_ops(), make_batch,
                                             steps_per_call, self.batch_sharding,
                                             self.replicated)
    return jax.jit(step, in_shardings=(self.replicated, self.replicated, batch_sharding),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, eval_step: Callable) -> Callable:
    return jax.jit(eval_step, in_shardings=(self.replicated, self.replicated,
                                            self.batch_sharding),
                   out_shardings=self.replicated)

  @staticmethod
  def reduce_gradients(grads):
    return grads

  # Teachers and the state are replicated here; the 2-D strategy shards them.
  def put_teacher(self, variables):
    return self.put_replicated(variables)

  def put_state(self, state):
    return self.put_replicated(state)


class Jit2DParallel(JitParallel):
  """`jax.jit` over a ('data', 'model') mesh: batch on 'data', teacher (and, with
  `shard_student`, the student's parameters and optimizer state) split on 'model' by
  `sharding_rules.TRANSFORMER_RULES`; whatever no rule splits is replicated.

  The step functions are compiled on their first call, when the state's and the teacher's
  trees are known (their shardings follow from the trees' paths and shapes).
  """
  batch_norm_axis_name = None

  def __init__(self, data: int, model: int, *, shard_student: bool = False):
    devices = np.array(jax.devices())
    if data * model != devices.size:
      raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, "
                       f"there are {devices.size}.")
    self.kind = "jit_2d_fsdp" if shard_student else "jit_2d"
    self.shard_student = shard_student
    # Devices in process order, 'model' fastest: a model group stays on one host when `model`
    # divides the local device count, so its collectives do not cross hosts.
    self.mesh = Mesh(devices.reshape(data, model), MESH_AXES,
                     axis_types=(AxisType.Auto,) * 2)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.num_devices = self.mesh.size
    self.model_size = model

  def shardings(self, tree):
    """NamedShardings for `tree` by the rules on the 'model' axis."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec),
                        sharding_rules.partition_specs(tree, self.model_size),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def state_shardings(self, state):
    if self.shard_student:
      return self.shardings(state)
    return jax.tree.map(lambda _: self.replicated, state)

  def put_teacher(self, variables):
    return jax.device_put(variables, self.shardings(variables))

  def put_state(self, state):
    return jax.device_put(state, self.state_shardings(state))

  def to_host(self, tree):
    """A (possibly model-sharded) tree back to host numpy arrays; on several hosts the
    shards are first gathered onto every device (device_get needs addressable data)."""
    if jax.process_count() > 1:
      tree = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
    return jax.device_get(tree)

  def _compile_on_first_call(self, build: Callable) -> Callable:
    """`build(state, teacher_variables) -> jitted function`, once per pair of tree structures."""
    compiled = {}

    def call(state, teacher_variables, batch):
      key = jax.tree.structure((state, teacher_variables))
      if key not in compiled:
        compiled[key] = build(state, teacher_variables)
      return compiled[key](state, teacher_variables, batch)
    return call

  def compile_train_step(self, train_step: Callable, make_batch: Optional[Callable] = None,
                         steps_per_call: int = 1) -> Callable:
    step, batch_sharding = _step_for_compile(train_step, single_device_ops(), make_batch,
                                             steps_per_call, self.batch_sharding,
                                             self.replicated)  # As JitParallel's.

    def build(state, teacher_variables):
      state_shardings = self.state_shardings(state)
      return jax.jit(step, in_shardings=(state_shardings, self.shardings(teacher_variables),
                                         batch_sharding),
                     out_shardings=(state_shardings, self.replicated), donate_argnums=(0,))
    return self._compile_on_first_call(build)

  def compile_eval_step(self, eval_step: Callable) -> Callable:
    def build(state, teacher_variables):
      return jax.jit(eval_step, in_shardings=(self.state_shardings(state),
                                              self.shardings(teacher_variables),
                                              self.batch_sharding),
                     out_shardings=self.replicated)
    return self._compile_on_first_call(build)


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
  # A method's own BatchNorm (FitNets' ConvReg) takes cross-replica statistics, as models do.
  batch_norm = functools.partial(nn.BatchNorm, axis_name=PMAP_AXIS)
  return BatchOps(mean=mean, gather=gather, batch_norm=batch_norm)


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

  def compile_train_step(self, train_step: Callable, make_batch: Optional[Callable] = None,
                         steps_per_call: int = 1) -> Callable:
    if make_batch is not None or steps_per_call != 1:  # config validation refuses this first.
      raise ValueError("parallel 'pmap' takes per-device host batches; batches made on the "
                       "devices (config.device_batches) and several steps a call "
                       "(config.steps_per_call) need jit, jit_2d or jit_2d_fsdp.")
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

  def put_teacher(self, variables):
    return self.put_replicated(variables)

  def put_state(self, state):
    return self.put_replicated(state)


def first_local_replica(x) -> np.ndarray:
  """Replica 0 of a pmapped array, read from this process's devices only (`x[0]` would
  address a global, multi-host array)."""
  shard = np.asarray(x.addressable_shards[0].data)
  return shard[0] if shard.ndim == x.ndim else shard


def get_parallel(kind: str, mesh=""):
  """The strategy `config.parallel` names; `mesh` is `config.mesh` (only for the 2-D kinds):
  its text, or the (data, model) sizes a `RunPlan` parsed from it."""
  if kind not in PARALLEL_KINDS:
    raise ValueError(f"config.parallel={kind!r} is not valid; choose one of {PARALLEL_KINDS}.")
  data, model = (mesh if isinstance(mesh, tuple) else
                 mesh_shape(kind, mesh, jax.device_count()))
  if kind == "jit":
    return JitParallel()
  if kind == "pmap":
    return PmapParallel()
  return Jit2DParallel(data, model, shard_student=kind == "jit_2d_fsdp")


def metrics_to_host(parallel, metrics) -> dict:
  """Device metrics (replicated) to Python floats."""
  if parallel.kind == "pmap":
    return {k: float(first_local_replica(v)) for k, v in metrics.items()}
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
