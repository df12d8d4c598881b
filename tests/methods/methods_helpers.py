"""Shared builders for the method tests (imported by tests/methods/test_methods_*.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import methods
from kdjax.methods import Batch, BatchOps, single_device_ops
from kdjax.models.output import Output
from kdjax.train import parallel

PMAP_AXIS = "batch"


def build(name, **overrides):
  cls = methods.get_method_class(name)
  config = cls.default_config()
  config.update(overrides)
  return cls(config)


def random_batch(seed, shape=(8, 5), *, num_teachers=None, step=0, masked=None,
                 garbage=False):
  """A Batch with random logits of `shape` ([b, C] or [b, T, V]).

  masked: a bool array of shape[:-1], True where the row / token is padding (where=False).
  garbage: fill the padding with NaN / inf logits and -100 labels, as real padding may hold.
  """
  rng = np.random.default_rng(seed)
  student = rng.normal(size=shape).astype(np.float32) * 2
  teacher_shape = shape if num_teachers is None else (num_teachers,) + shape
  teacher = rng.normal(size=teacher_shape).astype(np.float32) * 3
  labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  where = np.ones(shape[:-1], bool) if masked is None else ~np.asarray(masked)
  if garbage and masked is not None:
    student[~where] = np.nan
    teacher[..., ~where, :] = np.inf
    labels[~where] = -100
  return Batch(student=Output(jnp.asarray(student), {}), teacher=Output(jnp.asarray(teacher), {}),
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.asarray(step, jnp.int32))


def select(batch):
  """The batch restricted to its selected rows / tokens (flattened to [K, C])."""
  where = np.asarray(batch.where)
  teacher = np.asarray(batch.teacher.logits)
  teacher = teacher[..., where, :] if teacher.ndim > where.ndim + 1 else teacher[where]
  return Batch(student=Output(jnp.asarray(np.asarray(batch.student.logits)[where]), {}),
               teacher=Output(jnp.asarray(teacher), {}),
               labels=jnp.asarray(np.asarray(batch.labels)[where]),
               where=jnp.ones((int(where.sum()),), bool), step=batch.step)


def with_student_logits(batch, logits):
  return Batch(student=Output(logits, {}), teacher=batch.teacher, labels=batch.labels,
               where=batch.where, step=batch.step)


def run(method, batch, ops=None, params=None, state=None):
  """init (if params/state not given) then loss; returns (loss, metrics, new_state, params)."""
  ops = ops or single_device_ops()
  if params is None or state is None:
    init_params, init_state = method.init(jax.random.PRNGKey(0), batch)
    params = init_params if params is None else params
    state = init_state if state is None else state
  loss, metrics, new_state = method.loss(params, state, batch, ops)
  return loss, metrics, new_state, params


def simulated_pmap_ops() -> BatchOps:
  """kdjax.train.parallel's own pmap ops; a `jax.vmap` axis named 'batch' stands in for
  pmap's (same collectives, on one device)."""

  return parallel._pmap_ops()  # pylint: disable=protected-access


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels):
  """Mean cross-entropy over all rows / tokens (float64)."""
  log_p = np_log_softmax(logits)
  return float(-np.take_along_axis(log_p, np.asarray(labels)[..., None], -1).mean())
