"""Evaluation as a list of metric functions, given by the task and the method.

A metric is `metric(batch: EvalBatch) -> {name: sum over the unmasked rows}`; the loop adds
the sums over the eval split and divides each by the number of examples, so every metric is a
per-example average (top-1, cross-entropy, agreement; per-exit accuracy for BYOT, k-NN
accuracy for DINO).
The eval step runs `task metrics + teacher metrics (with a teacher) + method.eval_metrics()`,
and knows none of them by name.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.models.output import Output


class EvalBatch(NamedTuple):
  """student / teacher: Outputs in eval mode (teacher None without one; several teachers'
  logits stacked on a leading axis); labels [b]; where [b] float32, 0 on padding rows;
  method_params / method_state: the method's trainable params and state, for metrics of
  method-owned parts (BYOT's exit heads, DINO's k-NN bank); None where the caller has none;
  stacked_teachers: the teacher's logits are several teachers' on a leading axis.
  For language models logits are [b, T, V] and labels / where [b, T]: every metric is then a
  per-token average."""
  student: Output
  teacher: Optional[Output]
  labels: jax.Array
  where: jax.Array
  method_params: Any = None
  method_state: Any = None
  stacked_teachers: bool = False


EvalMetric = Callable[[EvalBatch], Dict[str, jax.Array]]


def _sum(values, where):
  return jnp.sum(values * where)


def top1_accuracy(batch: EvalBatch) -> Dict[str, jax.Array]:
  prediction = jnp.argmax(batch.student.logits, -1)
  return {"accuracy": _sum(prediction == batch.labels, batch.where)}


def cross_entropy(batch: EvalBatch) -> Dict[str, jax.Array]:
  ce = optax.softmax_cross_entropy_with_integer_labels(
      batch.student.logits.astype(jnp.float32), batch.labels)
  return {"cross_entropy": _sum(ce, batch.where)}


def teacher_log_probs(teacher: Output, stacked: bool = False) -> jax.Array:
  """The teacher's log-probabilities; several (`stacked`) teachers: their average prediction."""
  log_probs = jax.nn.log_softmax(teacher.logits.astype(jnp.float32))
  return jnp.mean(log_probs, axis=0) if stacked else log_probs


def teacher_accuracy_and_agreement(batch: EvalBatch) -> Dict[str, jax.Array]:
  """The teacher's top-1 and cross-entropy, how often the student's top-1 equals the
  teacher's, and the overlap of the two distributions, sum_v min(p_teacher, p_student)
  = 1 - total variation: for a language model, the probability that a token the student drafts
  is accepted by the teacher in speculative sampling at temperature 1 (Leviathan et al. 2023,
  section 3.5, beta), here on the eval text (teacher forcing), so every token counts instead of
  the few prompts that real speculative decoding can afford."""
  log_probs = teacher_log_probs(batch.teacher, batch.stacked_teachers)
  teacher_prediction = jnp.argmax(log_probs, -1)
  labels = jnp.where(batch.where > 0, batch.labels, 0)  # Padding may hold any label.
  teacher_ce = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  # `uld`'s teacher may have more (or fewer) vocabulary rows than the student: the overlap
  # is over the ids both have (one tokenizer, embeddings padded differently).
  shared = min(log_probs.shape[-1], batch.student.logits.shape[-1])
  return {
      "teacher_accuracy": _sum(teacher_prediction == batch.labels, batch.where),
      "teacher_cross_entropy": _sum(teacher_ce, batch.where),
      "teacher_agreement": _sum(
          teacher_prediction == jnp.argmax(batch.student.logits, -1), batch.where),
      "teacher_overlap": _sum(jnp.sum(jnp.minimum(
          jnp.exp(log_probs[..., :shared]),
          jax.nn.softmax(batch.student.logits.astype(jnp.float32))[..., :shared]), -1),
                              batch.where),
  }


CLASSIFICATION_METRICS: Sequence[EvalMetric] = (top1_accuracy, cross_entropy)
TEACHER_METRICS: Sequence[EvalMetric] = (teacher_accuracy_and_agreement,)
