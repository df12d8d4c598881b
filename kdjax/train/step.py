"""Pure train and eval steps. Parallelism is applied to them in `parallel.py`."""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.methods.base import Batch, BatchOps, Method
from kdjax.methods.eval_metrics import (CLASSIFICATION_METRICS, TEACHER_METRICS, EvalBatch,
                                        EvalMetric)
from kdjax.models.apply import ApplyFn
from kdjax.models.output import Output
from kdjax.train.state import TrainState, student_variables

TEACHER_LOGITS_KEY = "teacher_logits"
# Batch entries the step consumes itself; every other entry reaches the method in Batch.data.
_STEP_KEYS = ("inputs", "labels", "mask", TEACHER_LOGITS_KEY)


def teacher_outputs(teacher_apply: Optional[ApplyFn], teacher_variables, batch: dict):
  """The teacher's Output for a batch, in eval mode, without gradient.

  When the batch carries cached teacher logits the teacher is not run at all.
  """
  if TEACHER_LOGITS_KEY in batch:
    return Output(jax.lax.stop_gradient(batch[TEACHER_LOGITS_KEY]), {})
  if teacher_apply is None:
    return None
  output, _ = teacher_apply(teacher_variables, batch["inputs"], train=False, rng=None)
  return jax.lax.stop_gradient(output)


def make_train_step(*, student_apply: ApplyFn, teacher_apply: Optional[ApplyFn],
                    method: Method, optimizer: optax.GradientTransformation,
                    reduce_gradients: Callable = lambda g: g,
                    skip_nonfinite: bool = False) -> Callable:
  """Builds `train_step(state, teacher_variables, batch, ops) -> (state, metrics)`.

  `batch` is {'inputs': [b, ...], 'labels': [b], optional 'mask': [b] bool, optional
  'teacher_logits': [b, C], and any other entries (such as 'index' [b]), which the method
  receives as `Batch.data`}. `ops` and `reduce_gradients` come from the parallel strategy.
  With `skip_nonfinite`, a step whose gradients are not finite leaves the state unchanged
  except for the step counter, and reports `skipped_nonfinite` = 1. (optax's own step count,
  which drives the learning-rate schedule, does not advance on a skipped step.)
  """

  def train_step(state: TrainState, teacher_variables, batch: dict, ops: BatchOps):
    rng = jax.random.fold_in(state.rng, state.step)
    model_rng, method_rng = jax.random.split(rng)
    labels = batch["labels"]
    where = batch.get("mask", jnp.ones(labels.shape, bool))
    teacher = teacher_outputs(teacher_apply if method.needs_teacher else None,
                              teacher_variables, batch)

    def loss_fn(params):
      variables = {"params": params["student"], **state.model_state}
      student, new_model_state = student_apply(variables, batch["inputs"], train=True,
                                               rng=model_rng)
      data = {k: v for k, v in batch.items() if k not in _STEP_KEYS}
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
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        model_state={**state.model_state, **new_model_state}, method_state=new_method_state)
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
                   metrics: Sequence[EvalMetric] = CLASSIFICATION_METRICS) -> Callable:
  """Builds `eval_step(state, teacher_variables, batch) -> sums`.

  Returns `{'count': unmasked rows, **each metric's sums}` for one batch (the caller adds them
  up and divides by the count). With a teacher, `TEACHER_METRICS` run as well.
  """
  metrics = tuple(metrics) + (TEACHER_METRICS if teacher_apply is not None else ())

  def eval_step(state: TrainState, teacher_variables, batch: dict):
    where = batch["mask"].astype(jnp.float32)
    student, _ = student_apply(student_variables(state), batch["inputs"], train=False, rng=None)
    teacher = teacher_outputs(teacher_apply, teacher_variables, batch)
    eval_batch = EvalBatch(student=student, teacher=teacher, labels=batch["labels"],
                           where=where)
    sums = {"count": jnp.sum(where)}
    for metric in metrics:
      for name, value in metric(eval_batch).items():
        if name in sums:
          raise ValueError(f"Eval metric {name!r} is reported twice (by {metric.__name__}).")
        sums[name] = value
    return sums

  return eval_step
