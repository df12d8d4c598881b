"""Pure train and eval steps. Parallelism is applied to them in `parallel.py`."""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.methods.base import (STUDENT_VIEW_PREFIX, TEACHER_VIEW_PREFIX, Batch, BatchOps,
                                Method, StepModels)
from kdjax.methods.eval_metrics import (CLASSIFICATION_METRICS, TEACHER_METRICS, EvalBatch,
                                        EvalMetric)
from kdjax.models.apply import ApplyFn
from kdjax.models.output import Output
from kdjax.train.state import TrainState, student_variables

# Cached teacher outputs in a batch replace running the teacher: all logits, or the top-k
# logits and their class ids, and feature taps under 'teacher_features/<tap>'.
TEACHER_LOGITS_KEY = "teacher_logits"
TEACHER_TOPK_LOGITS_KEY = "teacher_topk_logits"
TEACHER_TOPK_INDICES_KEY = "teacher_topk_indices"
TEACHER_FEATURES_PREFIX = "teacher_features/"
_CACHE_KEYS = (TEACHER_LOGITS_KEY, TEACHER_TOPK_LOGITS_KEY, TEACHER_TOPK_INDICES_KEY)


# A language-model batch names its inputs and labels `tokens` [b, T] and `targets` [b, T]
# (DESIGN.md); a classifier's are `inputs` [b, ...] and `labels` [b].
_INPUT_KEYS = ("inputs", "tokens")
_LABEL_KEYS = ("labels", "targets")


def _is_step_key(key: str) -> bool:
  """Batch entries the step consumes itself; every other one reaches the method's Batch.data."""
  return key in _INPUT_KEYS + _LABEL_KEYS + ("mask",) + _CACHE_KEYS or key.startswith(
      TEACHER_FEATURES_PREFIX)


def batch_inputs(batch: dict) -> jax.Array:
  """The model inputs of a batch: `inputs` (classifiers) or `tokens` (language models)."""
  return batch["inputs"] if "inputs" in batch else batch["tokens"]


def batch_labels(batch: dict) -> jax.Array:
  """The labels of a batch: `labels` [b] (classifiers) or `targets` [b, T] (language models)."""
  return batch["labels"] if "labels" in batch else batch["targets"]


def topk_to_logits(topk_logits: jax.Array, topk_indices: jax.Array,
                   num_classes: int) -> jax.Array:
  """[..., k] logits at class ids [..., k] -> [..., num_classes] logits, -inf elsewhere: the
  softmax of the result is the renormalised top-k distribution (`losses.sparse_kd`'s target),
  so a KD-like method learns from a top-k cache unchanged."""
  dense = jnp.full(topk_logits.shape[:-1] + (num_classes,), -jnp.inf, topk_logits.dtype)
  return jnp.put_along_axis(dense, topk_indices, topk_logits, axis=-1, inplace=False)


def _num_classes(student_apply: ApplyFn, state: TrainState, inputs) -> int:
  """The student's number of classes, from shapes only (no computation)."""
  return jax.eval_shape(lambda: student_apply(student_variables(state), inputs, train=False,
                                              rng=None)[0].logits).shape[-1]


def teacher_outputs(teacher_apply: Optional[ApplyFn], teacher_variables, batch: dict, *,
                    num_classes: Optional[int] = None):
  """The teacher's Output for a batch, in eval mode, without gradient.

  When the batch carries cached teacher outputs the teacher is not run at all (a top-k cache
  needs `num_classes`).
  """
  features = {key[len(TEACHER_FEATURES_PREFIX):]: value for key, value in batch.items()
              if key.startswith(TEACHER_FEATURES_PREFIX)}
  if TEACHER_LOGITS_KEY in batch:
    return jax.lax.stop_gradient(Output(batch[TEACHER_LOGITS_KEY], features))
  if TEACHER_TOPK_LOGITS_KEY in batch:
    logits = topk_to_logits(batch[TEACHER_TOPK_LOGITS_KEY], batch[TEACHER_TOPK_INDICES_KEY],
                            num_classes)
    return jax.lax.stop_gradient(Output(logits, features))
  if teacher_apply is None:
    return None
  output, _ = teacher_apply(teacher_variables, batch_inputs(batch), train=False, rng=None)
  return jax.lax.stop_gradient(output)


def make_train_step(*, student_apply: ApplyFn, teacher_apply: Optional[ApplyFn],
                    method: Method, optimizer: optax.GradientTransformation,
                    reduce_gradients: Callable = lambda g: g,
                    skip_nonfinite: bool = False) -> Callable:
  """Builds `train_step(state, teacher_variables, batch, ops) -> (state, metrics)`.

  `batch` is {'inputs': [b, ...], 'labels': [b], optional 'mask': [b] bool, optional cached
  teacher outputs ('teacher_logits' [b, C], or 'teacher_topk_logits' / 'teacher_topk_indices'
  [b, k], and 'teacher_features/<tap>'), and any other entries (such as 'index' [b]), which
  the method receives as `Batch.data`}; the Outputs of the student and the teacher on the
  method's extra input views (`Method.views`) join `Batch.data` as well. `ops` and
  `reduce_gradients` come from the parallel strategy.
  With `skip_nonfinite`, a step whose gradients are not finite leaves the state unchanged
  except for the step counter, and reports `skipped_nonfinite` = 1. (optax's own step count,
  which drives the learning-rate schedule, does not advance on a skipped step.)
  """

  def train_step(state: TrainState, teacher_variables, batch: dict, ops: BatchOps):
    rng = jax.random.fold_in(state.rng, state.step)
    model_rng, method_rng = jax.random.split(rng)
    if method.rewrites_batch:  # On-policy continuations (GKD), teacher generations (SeqKD).
      batch, method_state = method.rewrite_batch(
          state.method_state, batch, StepModels(
              student_apply=student_apply,
              student_variables=jax.lax.stop_gradient(student_variables(state)),
              teacher_apply=teacher_apply if method.needs_teacher else None,
              teacher_variables=teacher_variables),
          jax.random.fold_in(method_rng, 1), ops, state.step)
      state = state.replace(method_state=method_state)
    inputs, labels = batch_inputs(batch), batch_labels(batch)
    where = batch.get("mask", jnp.ones(labels.shape, bool))
    num_classes = (_num_classes(student_apply, state, inputs)
                   if TEACHER_TOPK_LOGITS_KEY in batch else None)
    if method.self_teacher:  # The student's apply on variables the method keeps (EMA, DINO).
      teacher_variables = method.teacher_variables_from_state(state.method_state)
      teacher = teacher_outputs(student_apply, teacher_variables, batch)
      view_teacher_apply = student_apply
    else:
      teacher = teacher_outputs(teacher_apply if method.needs_teacher else None,
                                teacher_variables, batch, num_classes=num_classes)
      cached = any(key in batch for key in _CACHE_KEYS)
      view_teacher_apply = teacher_apply if method.needs_teacher and not cached else None
    # A method's extra input views (multi-crop): the teacher sees those it names.
    views = method.views(batch, method_rng)
    view_data = {}
    if view_teacher_apply is not None:
      for name in method.teacher_views:
        view_data[TEACHER_VIEW_PREFIX + name] = teacher_outputs(
            view_teacher_apply, teacher_variables, {"inputs": views[name]})

    def loss_fn(params):
      variables = {"params": params["student"], **state.model_state}
      student, new_model_state = student_apply(variables, inputs, train=True, rng=model_rng)
      data = {k: v for k, v in batch.items() if not _is_step_key(k)}
      data.update(view_data)
      for i, (name, view) in enumerate(views.items()):
        # Model state (BatchNorm statistics) moves on through the views, as in a framework
        # that runs the model once per crop.
        data[STUDENT_VIEW_PREFIX + name], view_model_state = student_apply(
            {"params": params["student"], **state.model_state, **new_model_state}, view,
            train=True, rng=jax.random.fold_in(model_rng, i + 1))
        new_model_state = {**new_model_state, **view_model_state}
      loss, metrics, new_method_state = method.loss(
          params["method"], state.method_state,
          Batch(student=student, teacher=teacher, labels=labels, where=where, step=state.step,
                rng=method_rng, data=data,
                teacher_variables=(jax.lax.stop_gradient(teacher_variables)
                                   if teacher is not None else None)), ops)
      return loss, (metrics, new_model_state, new_method_state)

    grads, (metrics, new_model_state, new_method_state) = jax.grad(
        loss_fn, has_aux=True)(state.params)
    grads = reduce_gradients(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    model_state = {**state.model_state, **new_model_state}
    new_method_state = method.update_after_step(
        new_method_state, {"params": params["student"], **model_state}, state.step,
        **({"method_params": params["method"]} if method.update_reads_method_params else {}))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        model_state=model_state, method_state=new_method_state)
    metrics = dict(metrics, grad_norm=grad_norm)
    if skip_nonfinite:
      # Decided on the gradients, which are already reduced over devices, so every replica
      # of a pmap makes the same choice (a local loss could differ between replicas).
      finite = jnp.isfinite(grad_norm)
      kept = state.replace(step=state.step + 1)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
      metrics["skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  return train_step


def make_eval_step(*, student_apply: ApplyFn, teacher_apply: Optional[ApplyFn],
                   metrics: Sequence[EvalMetric] = CLASSIFICATION_METRICS,
                   self_teacher: Optional[Callable] = None,
                   stacked_teachers: bool = False) -> Callable:
  """Builds `eval_step(state, teacher_variables, batch) -> sums`.

  Returns `{'count': unmasked rows, **each metric's sums}` for one batch (the caller adds them
  up and divides by the count). With a teacher, `TEACHER_METRICS` run as well. `self_teacher`
  (a method's `teacher_variables_from_state`) makes the teacher the student's apply function
  on variables from the method state. `stacked_teachers`: the teacher's logits are several
  teachers' stacked on a leading axis (`Method.multiple_teachers`).
  """
  has_teacher = teacher_apply is not None or self_teacher is not None
  metrics = tuple(metrics) + (TEACHER_METRICS if has_teacher else ())

  def eval_step(state: TrainState, teacher_variables, batch: dict):
    where = batch["mask"].astype(jnp.float32)
    student, _ = student_apply(student_variables(state), batch_inputs(batch), train=False,
                               rng=None)
    if self_teacher is not None:
      teacher = teacher_outputs(student_apply, self_teacher(state.method_state), batch)
    else:
      teacher = teacher_outputs(teacher_apply, teacher_variables, batch)
    eval_batch = EvalBatch(student=student, teacher=teacher, labels=batch_labels(batch),
                           where=where, method_params=state.params["method"],
                           method_state=state.method_state, stacked_teachers=stacked_teachers)
    sums = {"count": jnp.sum(where)}
    for metric in metrics:
      for name, value in metric(eval_batch).items():
        if name in sums:
          raise ValueError(f"Eval metric {name!r} is reported twice (by {metric.__name__}).")
        sums[name] = value
    return sums

  return eval_step
