"""What a distillation method is, as the train step sees it.

A method turns one batch's student and teacher outputs into a scalar loss. It may own
trainable parameters (connectors, a learnable temperature), trained with the student and
saved in its checkpoint, and non-trainable state (memory banks, EMA teachers), carried in the
train state. It knows nothing of devices: the step hands it `BatchOps` whose `mean` averages
over the global batch and whose `gather` returns the global batch for relational losses.
"""

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from kdjax import validation

from kdjax.models.output import Output


class BatchOps(NamedTuple):
  """Reductions over the global batch, supplied by the train step.

  mean(values [b], where [b]) -> scalar: the average over the selected examples of the
    whole global batch, the same value on every device whatever the parallelism (its
    gradient is arranged so that the step's gradient averaging gives the global gradient).
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

  student: the student's Output (with gradient); logits [b, C], or [b, T, V] for sequences.
  teacher: the teacher's Output under stop_gradient, or None for methods without teacher;
    for `multiple_teachers` methods its logits are stacked: [N_teachers, *student logits].
  labels: [b] int labels ([b, T] for sequences).
  where: [b] bool ([b, T] for sequences), False on padding rows / tokens.
  step: scalar int, the optimizer step (for warm-ups and curricula).
  rng: a key for the method's own randomness (negatives, crops), folded by step; the same
    on every device.
  data: the rest of the input batch: 'index' [b] int32, each example's position in the
    training split (for memory banks and per-example histories), and whatever else a
    pipeline adds.
  student_variables: at `init` only, the student's initial variables (EMA/DINO teachers start
    as a copy); None in the loss.
  teacher_variables: the teacher's variables under stop_gradient (a list for
    `multiple_teachers`), for methods whose loss reads the teacher's parameters (OFD's margins
    from the teacher's BatchNorm statistics); None without a teacher.
  """
  student: Output
  teacher: Optional[Output]
  labels: jax.Array
  where: jax.Array
  step: jax.Array
  rng: Optional[jax.Array] = None
  data: Dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  teacher_variables: Any = None
  # At `init` only: the student's initial variables ({'params', **model_state}), for a teacher
  # that starts as a copy of the student (EMA, DINO). None in the loss.
  student_variables: Any = None


class StepModels(NamedTuple):
  """The models a method's `rewrite_batch` may run inside the train step: pure apply functions
  and their variables (the student's as of this step, under stop_gradient; the teacher's, or
  None without a teacher)."""
  student_apply: Callable
  student_variables: Any
  teacher_apply: Optional[Callable]
  teacher_variables: Any


Metrics = Dict[str, jax.Array]

# Where the step puts the Outputs of the student and the teacher on a method's extra input
# views (`Method.views`) in `Batch.data`.
STUDENT_VIEW_PREFIX = "student_view/"
TEACHER_VIEW_PREFIX = "teacher_view/"


class Method(abc.ABC):
  """Base class. Subclasses set `name` and implement `loss`; they are constructed from their
  hyper-parameters `config[name]`, which `__init__` checks and keeps as `self.config`.

  The common checks are declared, not written: fields in `non_negative_fields` must be numbers
  >= 0 and those in `positive_fields` numbers > 0. A method with further rules extends
  `__init__` after calling `super().__init__(config)`.
  """

  name: ClassVar[str]
  needs_teacher: ClassVar[bool] = True
  non_negative_fields: ClassVar[Tuple[str, ...]] = ()
  positive_fields: ClassVar[Tuple[str, ...]] = ()
  # True for methods that distil from several teachers at once: their `Batch.teacher.logits`
  # is the teachers' logits stacked on a new leading axis, [N_teachers, b, ..., C].
  multiple_teachers: ClassVar[bool] = False
  # What the method can learn from when the teacher's outputs are read from a cache instead
  # of running the teacher: 'topk' (the teacher's top-k logits suffice: KD-like losses, where
  # the classes outside the top k get probability 0 and the kept ones are renormalised, i.e.
  # `losses.sparse_kd`), 'logits' (needs every logit: DKD's non-target split, DIST's
  # correlations, standardised logits) or 'features' (needs cached feature taps as well).
  teacher_cache_needs: ClassVar[str] = "logits"
  # The training batches the method reads: 'uniform' (shuffled examples) or 'class_pairs'
  # (second half = a same-class partner of each first-half row: CS-KD), `kdjax.data.pairing`.
  sampler: ClassVar[str] = "uniform"
  # A method whose suite row is a chain of generations, each the teacher of the next (born-again
  # networks): the name of its config field holding the number of generations; None otherwise.
  generations_field: ClassVar[Optional[str]] = None

  @classmethod
  def default_config(cls) -> "ml_collections.ConfigDict":
    """The method's hyper-parameters, stored in experiment configs as `config.<name>`."""
    # Imported here: code that only runs methods (the GPU benchmark image) has no ml_collections.
    import ml_collections  # pylint: disable=g-import-not-at-top
    return ml_collections.ConfigDict()

  # The training split's size, for methods with per-example memory (CRD's memory bank); set
  # by `build_method` once the data is open, None where unknown (config validation).
  num_train_examples: Optional[int] = None
  # The run's (main) teacher model name, `config.teacher.model`: for methods that read the
  # teacher's parameters by model (OFD's BatchNorms before ReLUs). Set by `build_method`.
  teacher_model: Optional[str] = None
  # The training split's labels [N] for methods that sample by class (CRD's other-class
  # negatives); set by the run when `needs_train_labels`, from an in-memory dataset.
  train_labels: Optional[Any] = None
  needs_train_labels: bool = False
  # The pmap axis name for BatchNorm in method-owned modules (connectors, ABF), as models get
  # it: cross-replica statistics under pmap; None under jit, where the batch is global anyway.
  # Set by the run before `init`.
  batch_norm_axis_name: Optional[str] = None

  def __init__(self, config: "ml_collections.ConfigDict"):
    for field in self.non_negative_fields:
      check_non_negative(config, self.name, field)
    for field in self.positive_fields:
      check_positive(config, self.name, field)
    self.config = config

  def init(self, rng: jax.Array, sample: Batch) -> Tuple[Any, Any]:
    """Returns (trainable params, non-trainable state); both empty by default."""
    del rng, sample
    return {}, {}

  # True for methods whose teacher is the student's own apply function on variables kept in
  # method state (EMA, DINO): the step runs it, in eval mode without gradient, on
  # `teacher_variables_from_state(state)`, and no teacher checkpoint is loaded.
  self_teacher: ClassVar[bool] = False

  def teacher_variables_from_state(self, state: Any) -> Any:
    """The self-teacher's variables ({'params', **model_state}) held in method state."""
    raise TypeError(f"{self.name} sets self_teacher but does not say where its "
                              "teacher's variables are.")

  def update_after_step(self, state: Any, student_variables: Any, step: jax.Array) -> Any:
    """The method state after the optimizer step, given the student's new variables (an EMA
    teacher moves towards them here). Runs inside the jitted step; identity by default."""
    del student_variables, step
    return state

  # True for methods whose state follows their own trainable params (DINO's teacher head is
  # an EMA of the student's head): `update_after_step` then also gets `method_params=` (the
  # method's new params). Off by default, so existing hooks keep their signature.
  update_reads_method_params: ClassVar[bool] = False

  def views(self, batch: Dict[str, jax.Array], rng: jax.Array) -> Dict[str, jax.Array]:
    """Extra views of the batch's inputs (multi-crop augmentation), by name; none by default.

    The step runs the student on each view (train mode, with gradient) and puts its Output in
    `Batch.data[STUDENT_VIEW_PREFIX + name]`; the views named in `teacher_views` also go
    through the teacher (eval mode, no gradient) into `Batch.data[TEACHER_VIEW_PREFIX + name]`.
    `batch` is the step's input batch ('inputs' [b, ...], 'index' [b], ...; local to the
    device under pmap: draw per-example randomness from 'index' for numbers that do not depend
    on the device count); `rng` is `Batch.rng` (the same on every device, a pure function of
    (seed, step)). Runs inside the jitted step.
    """
    del batch, rng
    return {}

  # The names among `views` that the teacher sees as well (DINO: the global crops).
  teacher_views: ClassVar[Tuple[str, ...]] = ()

  # True for methods that rewrite the input batch inside the jitted step, before the teacher
  # and the student run on it: on-policy distillation (GKD) replaces continuations by the
  # student's samples, sequence-level KD trains on the teacher's generations.
  rewrites_batch: ClassVar[bool] = False

  def rewrite_batch(self, state: Any, batch: Dict[str, jax.Array], models: StepModels,
                    rng: jax.Array, ops: BatchOps,
                    step: jax.Array) -> Tuple[Dict[str, jax.Array], Any]:
    """Returns (the batch the step trains on, the new method state); identity by default.

    Runs inside the jitted step, before the teacher's outputs are computed (so the teacher
    sees the rewritten batch). `batch` is the step's input batch (a language model's:
    'tokens', 'targets', 'mask' [b, T], 'index' [b]; local to the device under pmap); `rng` is
    the same on every device (a pure function of (seed, step)), so a random choice made from it
    alone (GKD's on-/off-policy draw) is the same everywhere. `step` is the optimizer step.
    """
    del models, rng, ops, step
    return batch, state

  # True for methods whose state follows the periodic evaluations (DistiLLM's adaptive
  # off-policy threshold): the loop calls `after_evaluation` after each one.
  reacts_to_evaluation: ClassVar[bool] = False

  def after_evaluation(self, state: Any, eval_metrics: Dict[str, float]) -> Any:
    """The method state (host numpy arrays) after a periodic evaluation with these averages
    ('cross_entropy', 'accuracy', ...); runs on the host, outside the jitted step."""
    del eval_metrics
    return state

  def eval_metrics(self) -> Sequence[Callable]:
    """Metrics evaluated beside the task's (see `eval_metrics.EvalMetric`): a method with
    auxiliary exits reports each exit's accuracy here. None by default."""
    return ()

  @abc.abstractmethod
  def loss(self, params: Any, state: Any, batch: Batch,
           ops: BatchOps) -> Tuple[jax.Array, Metrics, Any]:
    """Returns (scalar loss, metrics of scalars, new state)."""


def ce_term_and_kd(batch: Batch, ops: BatchOps, config, terms: Dict[str, Tuple[Any, Any]],
                   extra_metrics: Optional[Dict[str, Any]] = None):
  """`ce_weight * CE + sum_k weight_k * term_k + kd_weight * KD(T)`, the objective of the
  feature and relational methods; the KD term is computed only when `kd_weight` > 0.

  Args:
    config: the method's config (`ce_weight`, `kd_weight`, `temperature`).
    terms: metric name -> (weight, scalar term).
    extra_metrics: more scalars to report.

  Returns:
    (loss, metrics): metrics hold 'ce', each term, 'kd' (when used), 'loss' and 'accuracy'.
  """
  from kdjax import losses  # pylint: disable=g-import-not-at-top
  ce = cross_entropy(batch, ops)
  loss = config.ce_weight * ce
  metrics = {"ce": ce, **(extra_metrics or {})}
  for name, (weight, term) in terms.items():
    loss = loss + weight * term
    metrics[name] = term
  if config.kd_weight:
    kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                            temperature=config.temperature, where=batch.where), batch.where)
    loss = loss + config.kd_weight * kd
    metrics["kd"] = kd
  return loss, dict(metrics, loss=loss, accuracy=accuracy(batch, ops))


def check_teacher_cache(method: "Method", *, topk: Optional[int], num_classes: int,
                        feature_taps: Sequence[str] = ()) -> None:
  """Raises ConfigError when `method` cannot learn from a teacher cache holding the top-`topk`
  logits (None: all `num_classes`) and the features `feature_taps`."""
  needs = method.teacher_cache_needs
  holds = (f"the teacher's top-{topk} of {num_classes} logits" if topk and topk < num_classes
           else f"all {num_classes} teacher logits")
  if needs != "topk" and topk and topk < num_classes:
    raise validation.ConfigError(
        f"The teacher cache holds {holds}, but method {method.name!r} needs all "
        f"{num_classes} logits; cache the full logits (top-k = {num_classes}) or use a method "
        "that learns from a top-k cache (kd, fkl, ctkd).")
  if needs == "features":
    wanted = list(getattr(method, "teacher_taps", ()))
    missing = [tap for tap in wanted if tap not in feature_taps]
    if missing:
      raise validation.ConfigError(
          f"The teacher cache holds {holds} and features {sorted(feature_taps) or 'none'}, "
          f"but method {method.name!r} needs the teacher taps {missing}; cache them too.")


def mask_rows(x: jax.Array, where: jax.Array) -> jax.Array:
  """`x` ([b, ..., C]) with the rows (or tokens) where `where` ([b, ...]) is False set to 0.

  Padding rows may hold anything (inf, NaN, "ignore" labels such as -100); replacing them
  before any arithmetic keeps them out of values and gradients, where multiplying by the mask
  afterwards would not (NaN * 0 is NaN).
  """
  where = where.astype(bool)
  return jnp.where(where.reshape(where.shape + (1,) * (x.ndim - where.ndim)), x, 0)


def cross_entropy(batch: Batch, ops: BatchOps) -> jax.Array:
  """Mean cross-entropy of the student on the labels; logits [b, C] with labels [b], or
  [b, T, V] with labels [b, T] (per-token, `batch.where` [b, T])."""
  logits = mask_rows(batch.student.logits.astype(jnp.float32), batch.where)
  labels = mask_rows(batch.labels, batch.where)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return ops.mean(per_example, batch.where)


def accuracy(batch: Batch, ops: BatchOps) -> jax.Array:
  """Top-1 accuracy (per token for [b, T, V] logits)."""
  correct = (jnp.argmax(batch.student.logits, -1) == batch.labels).astype(jnp.float32)
  return ops.mean(correct, batch.where)


def _require(config, method: str, field: str, rule: validation.Rule):
  validation.require(config[field], rule, f"config.{method}.{field}")


def check_positive(config, method: str, field: str):
  _require(config, method, field, validation.POSITIVE)


def check_non_negative(config, method: str, field: str):
  _require(config, method, field, validation.NON_NEGATIVE)


def check_number(config, method: str, field: str):
  _require(config, method, field, validation.FINITE)


def check_interval(config, method: str, field: str, low: float, high: float, *,
                   low_inclusive: bool = True, high_inclusive: bool = True):
  """Checks `low <= value <= high` (either end optionally open)."""
  _require(config, method, field, validation.interval(
      low, high, low_inclusive=low_inclusive, high_inclusive=high_inclusive))


def check_positive_int(config, method: str, field: str):
  _require(config, method, field, validation.POSITIVE_INT)

