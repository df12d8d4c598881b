"""What a distillation method is, as the train step sees it.

A method turns one batch's student and teacher outputs into a scalar loss. It may own
trainable parameters (connectors, a learnable temperature), trained with the student and
saved in its checkpoint, and non-trainable state (memory banks, EMA teachers), carried in the
train state. It knows nothing of devices: the step hands it `BatchOps` whose `mean` averages
over the global batch and whose `gather` returns the global batch for relational losses.
"""

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

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
  batch_norm: the constructor of a method-owned `flax.linen.BatchNorm` whose training
    statistics cover the global batch (under pmap the step binds the device axis here, so a
    method never names it); None: plain `nn.BatchNorm` (one device, or jit's global batch).
  """
  mean: Callable[[jax.Array, jax.Array], jax.Array]
  gather: Callable[[jax.Array], jax.Array]
  batch_norm: Optional[Callable[..., Any]] = None


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
    for ensemble methods (`TeacherNeeds.kind == 'ensemble'`) its logits are stacked:
    [N_teachers, *student logits].
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
    ensembles), for methods whose loss reads the teacher's parameters (OFD's margins
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


TEACHER_KINDS = ("none", "one", "ensemble", "self")
TEACHER_CACHE_LEVELS = ("topk", "logits", "features")


@dataclasses.dataclass(frozen=True)
class TeacherNeeds:
  """What a method needs from its teacher; `kdjax.teachers.choose` builds the source from it.

  kind: 'one' (the run's teacher checkpoint), 'ensemble' (every teacher of the run: its
    `Batch.teacher.logits` are the teachers' logits stacked on a new leading axis,
    [N_teachers, b, ..., C]), 'self' (the student's own apply function on variables the method
    keeps in its state, `teacher_variables_from_state`: EMA, DINO; no checkpoint is loaded) or
    'none'.
  cache: what outputs read from a cache instead of running the teacher must hold: 'topk' (the
    teacher's top-k logits suffice: KD-like losses, where the classes outside the top k get
    probability 0 and the kept ones are renormalised, i.e. `losses.sparse_kd`), 'logits' (every
    logit: DKD's non-target split, DIST's correlations) or 'features' (`taps` as well).
  taps: the teacher's feature taps the loss reads (`Output.features` names).
  views: the names among the method's extra input views (`Method.views`) that the teacher sees
    as well (DINO's global crops).
  on_batch_inputs: the loss reads the teacher's outputs on the batch's own inputs, so outputs
    computed ahead of the step (a cache) can stand in for running it. False for methods whose
    batch rewrite replaces what the teacher sees (SeqKD's generations, DistiLLM's samples);
    True where the rewrite keeps cached outputs right (AdaSPEC adds its reference's logits,
    GKD's on-policy branch recomputes the teacher's logits on its samples itself).
  """
  kind: str = "one"
  cache: str = "logits"
  taps: Tuple[str, ...] = ()
  views: Tuple[str, ...] = ()
  on_batch_inputs: bool = True

  def __post_init__(self):
    if self.kind not in TEACHER_KINDS:
      raise ValueError(f"TeacherNeeds.kind={self.kind!r}; valid: {', '.join(TEACHER_KINDS)}.")
    if self.cache not in TEACHER_CACHE_LEVELS:
      raise ValueError(f"TeacherNeeds.cache={self.cache!r}; valid: "
                       f"{', '.join(TEACHER_CACHE_LEVELS)}.")

  @property
  def checkpoint(self) -> bool:
    """True when the run must load teacher checkpoints ('one' or 'ensemble')."""
    return self.kind in ("one", "ensemble")

  @property
  def ensemble(self) -> bool:
    return self.kind == "ensemble"

  @property
  def self_teacher(self) -> bool:
    return self.kind == "self"


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What the run knows once its data is open, handed to `Method.prepare` in one call.

  num_train_examples: the training split's size (per-example memory: CRD, PS-KD); None where
    unknown (config validation, synthetic benchmarks).
  train_labels: () -> [N] int labels of the training split (CRD's other-class negatives);
    called only by methods that need them (it may read the whole split).
  teacher_model: the run's (main) teacher model name, `config.teacher.model` (OFD reads the
    teacher's BatchNorms by model); None without one.
  reference_variables: the frozen reference model's variables when the method declares a
    `reference_field` (AdaSPEC, MiniPLM); None otherwise.
  """
  num_train_examples: Optional[int] = None
  train_labels: Optional[Callable[[], Any]] = None
  teacher_model: Optional[str] = None
  reference_variables: Any = None


# The families `Method.family` names, in the order the reference pages list them.
FAMILIES = ("baseline", "logit", "feature", "self", "language model", "diffusion")

# One-line meanings of the hyper-parameters many methods share; a method's own `field_help`
# wins where the same name means something else there.
COMMON_FIELD_HELP: Mapping[str, str] = {
    "ce_weight": "weight of the cross-entropy on the labels",
    "kd_weight": "weight of the KD term (0: none)",
    "temperature": "softmax temperature T of the KD term",
    "feature_weight": "weight of the method's feature term",
    "student_tap": "the student's feature tap(s), comma-separated, paired in order with "
                   "teacher_tap",
    "teacher_tap": "the teacher's feature tap(s), comma-separated",
    "warmup_steps": "steps over which the distillation term's weight ramps from 0 to 1 "
                    "(0: none)",
    "num_train_steps": "the run's length in steps, for schedules (set to config.num_steps)",
    "num_steps": "the run's length in steps, for schedules (set to config.num_steps)",
    "max_new_tokens": "tokens sampled after the prompt (0: the rest of the window)",
    "prompt_length": "tokens of each window kept as the prompt (0: half the window)",
    "fused": "'auto', 'on' or 'off': the token-level divergence from hidden states, "
             "vocabulary-chunked (kdjax.methods.lm_fused)",
}


class Method(abc.ABC):
  """Base class. Subclasses set `name` and implement `loss`; they are constructed from their
  hyper-parameters `config[name]`, which `__init__` checks and keeps as `self.config`.

  Everything the run reads from a method is declared here, with a default that does nothing,
  grouped by when it runs:

  * declarations (read before anything is built): `name`, `teacher_needs`, `sampler`,
    `generations_field`, `reference_field`, `student_starts_from_teacher`, `non_negative_fields` / `positive_fields`,
    `default_config`;
  * setup, once per run on the host: `prepare(run_facts)`, `init`, `select_examples`,
    `pregenerate`;
  * inside the jitted step: `rewrite_batch`, `views`, `loss`;
  * after the optimizer step (jitted): `update_after_step`, and for self-teachers
    `teacher_variables_from_state`;
  * after an evaluation (host): `after_evaluation`; and `eval_metrics`, run by the eval step.

  The common checks are declared, not written: fields in `non_negative_fields` must be numbers
  >= 0 and those in `positive_fields` numbers > 0. A method with further rules extends
  `__init__` after calling `super().__init__(config)`.
  """

  # --- Declarations ------------------------------------------------------------------------
  name: ClassVar[str]
  # What the method needs from its teacher (`TeacherNeeds`). A method whose taps depend on its
  # config sets `self.teacher_needs = dataclasses.replace(type(self).teacher_needs, taps=...)`
  # in `__init__`.
  teacher_needs: TeacherNeeds = TeacherNeeds()
  non_negative_fields: ClassVar[Tuple[str, ...]] = ()
  positive_fields: ClassVar[Tuple[str, ...]] = ()
  # The training batches the method reads: 'uniform' (shuffled examples) or 'class_pairs'
  # (second half = a same-class partner of each first-half row: CS-KD), `kdjax.data.pairing`.
  sampler: ClassVar[str] = "uniform"
  # A method whose suite row is a chain of generations, each the teacher of the next (born-again
  # networks): the name of its config field holding the number of generations; None otherwise.
  generations_field: ClassVar[Optional[str]] = None
  # A method that reads a frozen model of the student's architecture (AdaSPEC's and MiniPLM's
  # reference): the name of its config field holding that model's checkpoint directory. The
  # run loads it and hands its variables over in `RunFacts.reference_variables`.
  reference_field: ClassVar[Optional[str]] = None
  # The student starts from a copy of its teacher's variables (same architecture) instead of
  # its own init: progressive distillation, where each round's student starts from the
  # round before (Salimans & Ho 2022, Algorithm 2).
  student_starts_from_teacher: ClassVar[bool] = False
  # What the reference pages and `--help` say about the method (`kdjax.reference`): its family
  # (one of `FAMILIES`), the paper it implements ('Hinton et al. 2015'), and one line per
  # hyper-parameter of `default_config` saying what it does. Fields not named here fall back
  # to a base class's `field_help`, then to `COMMON_FIELD_HELP` (ce_weight, temperature, ...).
  family: ClassVar[str] = ""
  paper: ClassVar[str] = ""
  field_help: ClassVar[Mapping[str, str]] = {}

  @classmethod
  def default_config(cls) -> "ml_collections.ConfigDict":
    """The method's hyper-parameters, stored in experiment configs as `config.<name>`."""
    # Imported here: code that only runs methods (the GPU benchmark image) has no ml_collections.
    import ml_collections  # pylint: disable=g-import-not-at-top
    return ml_collections.ConfigDict()

  def __init__(self, config: "ml_collections.ConfigDict"):
    for field in self.non_negative_fields:
      check_non_negative(config, self.name, field)
    for field in self.positive_fields:
      check_positive(config, self.name, field)
    self.config = config
    self.facts = RunFacts()

  # --- Setup (host, once per run) ----------------------------------------------------------
  def prepare(self, facts: RunFacts) -> None:
    """Takes what the run knows once its data is open, before `init`; keeps it as
    `self.facts` by default. A method that needs more (CRD's labels) extends it."""
    self.facts = facts

  def init(self, rng: jax.Array, sample: Batch) -> Tuple[Any, Any]:
    """Returns (trainable params, non-trainable state); both empty by default."""
    del rng, sample
    return {}, {}

  def select_examples(self, pipeline, *, teacher_apply, teacher_variables,
                      reference_apply) -> Optional[Any]:
    """The training examples to keep ([n] indices into the training split), chosen before
    the first step from the teacher (MiniPLM's difference sampling); None keeps them all."""
    del pipeline, teacher_apply, teacher_variables, reference_apply
    return None

  def pregenerate(self, state: Any, pipeline, *, teacher_apply, teacher_variables,
                  seed: int) -> Any:
    """The method state after work done once before the first step (SeqKD's teacher
    continuations of every training window); unchanged by default."""
    del pipeline, teacher_apply, teacher_variables, seed
    return state

  # --- Inside the step (jitted) ------------------------------------------------------------
  def rewrite_batch(self, state: Any, batch: Dict[str, jax.Array], models: StepModels,
                    rng: jax.Array, ops: BatchOps,
                    step: jax.Array) -> Tuple[Dict[str, jax.Array], Any]:
    """Returns (the batch the step trains on, the new method state); identity by default.

    Runs inside the jitted step, before the teacher's outputs are computed (so the teacher
    sees the rewritten batch): on-policy distillation (GKD) replaces continuations by the
    student's samples, sequence-level KD trains on the teacher's generations. `batch` is the
    step's input batch (a language model's: 'tokens', 'targets', 'mask' [b, T], 'index' [b];
    local to the device under pmap); `rng` is the same on every device (a pure function of
    (seed, step)), so a random choice made from it alone (GKD's on-/off-policy draw) is the
    same everywhere. `step` is the optimizer step.
    """
    del models, rng, ops, step
    return batch, state

  def views(self, batch: Dict[str, jax.Array], rng: jax.Array) -> Dict[str, jax.Array]:
    """Extra views of the batch's inputs (multi-crop augmentation), by name; none by default.

    The step runs the student on each view (train mode, with gradient) and puts its Output in
    `Batch.data[STUDENT_VIEW_PREFIX + name]`; the views named in `teacher_needs.views` also go
    through the teacher (eval mode, no gradient) into `Batch.data[TEACHER_VIEW_PREFIX + name]`.
    `batch` is the step's input batch ('inputs' [b, ...], 'index' [b], ...; local to the
    device under pmap: draw per-example randomness from 'index' for numbers that do not depend
    on the device count); `rng` is `Batch.rng` (the same on every device, a pure function of
    (seed, step)). Runs inside the jitted step.
    """
    del batch, rng
    return {}

  @abc.abstractmethod
  def loss(self, params: Any, state: Any, batch: Batch,
           ops: BatchOps) -> Tuple[jax.Array, Metrics, Any]:
    """Returns (scalar loss, metrics of scalars, new state)."""

  # --- After the optimizer step (jitted) ---------------------------------------------------
  def update_after_step(self, state: Any, student_variables: Any, step: jax.Array, *,
                        method_params: Any) -> Any:
    """The method state after the optimizer step, given the student's new variables and the
    method's own new params (an EMA teacher moves towards the student; DINO's teacher head
    towards the student's head). Runs inside the jitted step; identity by default."""
    del student_variables, step, method_params
    return state

  def teacher_variables_from_state(self, state: Any) -> Any:
    """The self-teacher's variables ({'params', **model_state}) held in method state; read
    when `teacher_needs.kind == 'self'`."""
    raise TypeError(f"{self.name} declares a self-teacher (teacher_needs.kind='self') but does "
                    "not say where its variables are (teacher_variables_from_state).")

  # --- After an evaluation -----------------------------------------------------------------
  def after_evaluation(self, state: Any, eval_metrics: Dict[str, float]) -> Any:
    """The method state (host numpy arrays) after a periodic evaluation with these averages
    ('cross_entropy', 'accuracy', ...): DistiLLM's adaptive off-policy threshold. Runs on the
    host, outside the jitted step; unchanged by default."""
    del eval_metrics
    return state

  def eval_metrics(self) -> Sequence[Callable]:
    """Metrics evaluated beside the task's (see `eval_metrics.EvalMetric`): a method with
    auxiliary exits reports each exit's accuracy here. None by default."""
    return ()

  def final_metrics(self, student_apply: Callable, student_variables: Any) -> Dict[str, Any]:
    """Metrics of the finished student that are not averages over eval batches (a diffusion
    student's sample quality: Fréchet distance of images it generates from fixed noise),
    merged into the run's summary (their names should start with 'eval_'). Host, once, after
    the final evaluation; `student_apply(variables, inputs, train=False)` as in the step.
    None by default."""
    del student_apply, student_variables
    return {}


def overrides(method, hook: str) -> bool:
  """True when `method` (a Method or its class) replaces the base class's no-op `hook` (the
  loop skips moving state to the host for a hook that would do nothing; a teacher cache is
  refused to methods that rewrite their batches)."""
  cls = method if isinstance(method, type) else type(method)
  return getattr(cls, hook) is not getattr(Method, hook)


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
  needs = method.teacher_needs.cache
  holds = (f"the teacher's top-{topk} of {num_classes} logits" if topk and topk < num_classes
           else f"all {num_classes} teacher logits")
  if needs != "topk" and topk and topk < num_classes:
    raise validation.ConfigError(
        f"The teacher cache holds {holds}, but method {method.name!r} needs all "
        f"{num_classes} logits; cache the full logits (top-k = {num_classes}) or use a method "
        "that learns from a top-k cache (kd, fkl, ctkd).")
  if needs == "features":
    wanted = list(method.teacher_needs.taps)
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


def check_non_negative_int(config, method: str, field: str):
  _require(config, method, field, validation.NON_NEGATIVE_INT)

