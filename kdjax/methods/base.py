"""What a distillation method is, as the train step sees it.

A method turns one batch's student and teacher outputs into a scalar loss. It may own
trainable parameters (connectors, a learnable temperature), trained with the student and
saved in its checkpoint, and non-trainable state (memory banks, EMA teachers), carried in the
train state. It knows nothing of devices: the step hands it `BatchOps` whose `mean` averages
over the global batch and whose `gather` returns the global batch for relational losses.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax.models.output import Output


class BatchOps(NamedTuple):
  """Reductions over the global batch, supplied by the train step.

  mean(values [b], where [b]) -> scalar: the average over the selected examples of the
    whole global batch (on every device, whatever the parallelism).
  gather(x [b, ...]) -> [B, ...]: the global batch, for batch-relational losses.
  """
  mean: Callable[[jax.Array, jax.Array], jax.Array]
  gather: Callable[[jax.Array], jax.Array]


def single_device_ops() -> BatchOps:
  def mean(values, where):
    where = where.astype(values.dtype)
    return jnp.sum(values * where) / jnp.maximum(jnp.sum(where), 1.0)
  return BatchOps(mean=mean, gather=lambda x: x)


@dataclasses.dataclass(frozen=True)
class Batch:
  """One step's inputs to a method's loss.

  student: the student's Output (with gradient).
  teacher: the teacher's Output under stop_gradient, or None for methods without teacher.
  labels: [b] int labels.
  where: [b] bool, False on padding rows.
  step: scalar int, the optimizer step (for warm-ups and curricula).
  """
  student: Output
  teacher: Optional[Output]
  labels: jax.Array
  where: jax.Array
  step: jax.Array


Metrics = Dict[str, jax.Array]


class Method:
  """Base class. Subclasses set `name`, read their hyper-parameters from
  `config[name]` in `__init__`, and implement `loss`."""

  name: ClassVar[str]
  needs_teacher: ClassVar[bool] = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The method's hyper-parameters, stored in experiment configs as `config.<name>`."""
    return ml_collections.ConfigDict()

  def init(self, rng: jax.Array, sample: Batch) -> Tuple[Any, Any]:
    """Returns (trainable params, non-trainable state); both empty by default."""
    del rng, sample
    return {}, {}

  def loss(self, params: Any, state: Any, batch: Batch,
           ops: BatchOps) -> Tuple[jax.Array, Metrics, Any]:
    """Returns (scalar loss, metrics of scalars, new state)."""
    raise NotImplementedError


def cross_entropy(batch: Batch, ops: BatchOps) -> jax.Array:
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      batch.student.logits.astype(jnp.float32), batch.labels)
  return ops.mean(per_example, batch.where)


def accuracy(batch: Batch, ops: BatchOps) -> jax.Array:
  correct = (jnp.argmax(batch.student.logits, -1) == batch.labels).astype(jnp.float32)
  return ops.mean(correct, batch.where)


def check_positive(config, method: str, field: str):
  value = config[field]
  if not isinstance(value, (int, float)) or value <= 0:
    raise ValueError(f"config.{method}.{field} must be a positive number, got {value!r}.")


def check_non_negative(config, method: str, field: str):
  value = config[field]
  if not isinstance(value, (int, float)) or value < 0:
    raise ValueError(f"config.{method}.{field} must be a number >= 0, got {value!r}.")
