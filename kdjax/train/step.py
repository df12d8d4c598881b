"""Pure train and eval steps. Parallelism is applied to them in `parallel.py`."""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.methods.base import (STUDENT_VIEW_PREFIX, TEACHER_VIEW_PREFIX, Batch, BatchOps,
                                Method, StepModels)
from kdjax.methods.eval_metrics import (CLASSIFICATION_METRICS, TEACHER_METRICS, EvalBatch,
                                        EvalMetric)
from kdjax.models.apply import ApplyFn
from kdjax.teachers import choose as teachers_choose
from kdjax.teachers import keys as teacher_keys
from kdjax.teachers.teacher import NO_TEACHER, Teacher
from kdjax.train.state import TrainState, student_variables

# A language-model batch names its inputs and labels `tokens` [b, T] and `targets` [b, T]
# (DESIGN.md); a classifier's are `inputs` [b, ...] and `labels` [b].
_INPUT_KEYS = ("inputs", "tokens")
_LABEL_KEYS = ("labels", "targets")


def _is_step_key(key: str) -> bool:
  """Batch entries the step consumes itself; every other one reaches the method's Batch.data."""
  return key in _INPUT_KEYS + _LABEL_KEYS + ("mask",) or teacher_keys.is_teacher_key(key)


def batch_inputs(batch: dict) -> jax.Array:
  """The model inputs of a batch: `inputs` (classifiers) or `tokens` (language models)."""
  return batch["inputs"] if "inputs" in batch else batch["tokens"]


def batch_labels(batch: dict) -> jax.Array:
  """The labels of a batch: `labels` [b] (classifiers) or `targets` [b, T] (language models)."""
  return batch["labels"] if "labels" in batch else batch["targets"]


def _with_num_classes(teacher: Teacher, student_apply: ApplyFn, state: TrainState,
                      batch: dict) -> Teacher:
  """`teacher`, knowing the number of classes when the batch carries a top-k cache (from the
  student's output shape: no computation)."""
  if teacher.num_classes is not None or teacher_keys.TOPK_LOGITS_KEY not in batch:
    return teacher
  num_classes = jax.eval_shape(lambda: student_apply(
      student_variables(state), batch_inputs(batch), train=False, rng=None)[0].logits).shape[-1]
  return dataclasses.replace(teacher, num_classes=num_classes)


def make_train_step(*, student_apply: ApplyFn, method: Method,
                    optimizer: optax.GradientTransformation,
                    teacher: Optional[Teacher] = None, teacher_apply: Optional[ApplyFn] = None,
                    reduce_gradients: Callable = lambda g: g,
                    skip_nonfinite: bool = False) -> Callable:
  """Builds `train_step(state, teacher_variables, batch, ops) -> (state, metrics)`.

  `teacher` is the run's `kdjax.teachers.Teacher` (chosen by `kdjax.teachers.choose`); code
  that builds a step by hand may give the loaded teacher's `teacher_apply` instead (or neither,
  for methods without a teacher), and the method's `teacher_needs` make the `Teacher`.

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

  if teacher is None:
    teacher = teachers_choose.for_method(method, teacher_apply=teacher_apply,
                                         student_apply=student_apply)

  def train_step(state: TrainState, teacher_variables, batch: dict, ops: BatchOps):
    rng = jax.random.fold_in(state.rng, state.step)
    model_rng, method_rng = jax.random.split(rng)
    run_teacher = _with_num_classes(teacher, student_apply, state, batch)
    teacher_variables = run_teacher.variables(teacher_variables, state.method_state)
    # On-policy continuations (GKD), teacher generations (SeqKD); identity for most methods.
    batch, method_state = method.rewrite_batch(
        state.method_state, batch, StepModels(
            student_apply=student_apply,
            student_variables=jax.lax.stop_gradient(student_variables(state)),
            teacher_apply=run_teacher.apply if run_teacher.present else None,
            teacher_variables=teacher_variables),
        jax.random.fold_in(method_rng, 1), ops, state.step)
    state = state.replace(method_state=method_state)
    inputs, labels = batch_inputs(batch), batch_labels(batch)
    where = batch.get("mask", jnp.ones(labels.shape, bool))
    teacher_output = run_teacher.outputs(teacher_variables, batch, inputs)
    # A method's extra input views (multi-crop): the teacher sees those it names, when it can
    # run (not from a cache).
    views = method.views(batch, method_rng)
    view_data = {}
    if run_teacher.apply is not None and not teacher_keys.holds_outputs(batch):
      for name in method.teacher_needs.views:
        view_data[TEACHER_VIEW_PREFIX + name] = run_teacher.run(teacher_variables, views[name])

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
          Batch(student=student, teacher=teacher_output, labels=labels, where=where,
                step=state.step, rng=method_rng, data=data,
                teacher_variables=(jax.lax.stop_gradient(teacher_variables)
                                   if teacher_output is not None else None)), ops)
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
        method_params=params["method"])
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


def make_eval_step(*, student_apply: ApplyFn, teacher: Optional[Teacher] = None,
                   teacher_apply: Optional[ApplyFn] = None,
                   metrics: Sequence[EvalMetric] = CLASSIFICATION_METRICS) -> Callable:
  """Builds `eval_step(state, teacher_variables, batch) -> sums`.

  Returns `{'count': unmasked rows, **each metric's sums}` for one batch (the caller adds them
  up and divides by the count). With a teacher (`teacher`, from
  `kdjax.teachers.choose.for_evaluation`, or a loaded `teacher_apply`), `TEACHER_METRICS` run
  as well; a stacked (ensemble) teacher's metrics read the teachers' mean.
  """
  if teacher is None:
    teacher = (Teacher(source="checkpoint", apply=teacher_apply) if teacher_apply is not None
               else NO_TEACHER)
  metrics = tuple(metrics) + (TEACHER_METRICS if teacher.present else ())

  def eval_step(state: TrainState, teacher_variables, batch: dict):
    where = batch["mask"].astype(jnp.float32)
    inputs = batch_inputs(batch)
    student, _ = student_apply(student_variables(state), inputs, train=False, rng=None)
    teacher_output = teacher.outputs(teacher.variables(teacher_variables, state.method_state),
                                     batch, inputs)
    eval_batch = EvalBatch(student=student, teacher=teacher_output, labels=batch_labels(batch),
                           where=where, method_params=state.params["method"],
                           method_state=state.method_state, stacked_teachers=teacher.stacked)
    sums = {"count": jnp.sum(where)}
    for metric in metrics:
      for name, value in metric(eval_batch).items():
        if name in sums:
          raise ValueError(f"Eval metric {name!r} is reported twice (by {metric.__name__}).")
        sums[name] = value
    return sums

  return eval_step
