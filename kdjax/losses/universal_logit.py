"""Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): distillation across
tokenizers, where the teacher's and the student's vocabularies (and token sequences) differ.

Two pieces, each a pure function:

* `sorted_probability_distance(s, t)`: the per-position distance between two distributions
  over *different* supports. Both softmax vectors are sorted in decreasing order and the
  shorter one is zero-padded to the longer vocabulary; the distance is the L1 norm of their
  difference, `sum_i |sort(p_s)_i - sort(p_t)_i|`. This is the paper's closed form of the
  Wasserstein-1 distance between the two distributions when every transport between two
  different tokens costs 1 and the supports are matched by rank (their eq. 4-5: the optimal
  plan under that cost pairs the i-th largest probabilities). No vocabulary mapping is needed.
* `align_completions(student_where, teacher_where)`: which teacher position each student
  position is compared with. Rule (the official code's, Nicolas-BZRD/llm-recipes,
  `models/distillation_model.py`): in each row, the k-th selected student token (the k-th
  completion token, counted from the start of the completion) is paired with the k-th selected
  teacher token; the longer completion is truncated to the shorter, so pairs exist for
  `k < min(n_student, n_teacher)`. With one tokenizer this pairs each token with itself.

`uld` composes the two: per student token, the distance to its aligned teacher token.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from kdjax.losses import _checks

ArrayLike = jax.typing.ArrayLike


def _sorted_probs(logits: jax.Array, temperature, width: int) -> jax.Array:
  """[..., width] float32 softmax(logits / T) sorted in decreasing order, zero-padded."""
  probs = jax.nn.softmax(_checks.upcast(logits) / temperature, axis=-1)
  # jnp.sort is ascending; negating sorts decreasingly with the same stable gradient.
  ordered = -jnp.sort(-probs, axis=-1)
  pad = width - logits.shape[-1]
  return jnp.pad(ordered, [(0, 0)] * (logits.ndim - 1) + [(0, pad)])


def sorted_probability_distance(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                                student_temperature: float = 1.0,
                                teacher_temperature: float = 1.0,
                                where: Optional[ArrayLike] = None) -> jax.Array:
  """ULD's distance between two next-token distributions over different vocabularies.

  `sum_i |sort(p_s)_i - sort(p_t)_i|`, `p = softmax(z / T)` sorted decreasingly, the shorter
  vector zero-padded to `max(V_s, V_t)` (Boizard et al. 2024, eq. 5). In [0, 2]; 0 iff the
  two distributions are equal up to a relabelling of tokens.

  Args:
    student_logits: [..., V_s].
    teacher_logits: [..., V_t], the same leading shape; V_t may differ from V_s.
    student_temperature, teacher_temperature: softmax temperatures (the official code keeps
      one per model; both 1 by default).
    where: optional [...] mask; masked entries are 0 with zero gradient, whatever the logits
      hold there (inf, NaN).

  Returns:
    [...] float32 distances.

  Example (sorted: [0.6, 0.4, 0] against [0.5, 0.3, 0.2]; 0.1 + 0.1 + 0.2):
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.log(jnp.array([[0.4, 0.6]]))
    >>> t = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
    >>> print(f"{float(losses.sorted_probability_distance(s, t)[0]):.4f}")
    0.4000
  """
  name = "sorted_probability_distance"
  s = _checks.check_logits(name, "student_logits", student_logits)
  t = _checks.check_logits(name, "teacher_logits", teacher_logits)
  if s.shape[:-1] != t.shape[:-1]:
    raise ValueError(f"{name}: student_logits {tuple(s.shape)} and teacher_logits "
                     f"{tuple(t.shape)} must share the leading shape (only the vocabulary "
                     "axis may differ)")
  _checks.check_positive(name, "student_temperature", student_temperature)
  _checks.check_positive(name, "teacher_temperature", teacher_temperature)
  mask = _checks.check_where(name, where, s.shape[:-1])
  if mask is not None:
    s = jnp.where(mask[..., None], s, 0)
    t = jnp.where(mask[..., None], t, 0)
  width = max(s.shape[-1], t.shape[-1])
  distance = jnp.sum(jnp.abs(_sorted_probs(s, student_temperature, width)
                             - _sorted_probs(t, teacher_temperature, width)), axis=-1)
  return distance if mask is None else jnp.where(mask, distance, 0.0)


def align_completions(student_where: ArrayLike,
                      teacher_where: ArrayLike) -> Tuple[jax.Array, jax.Array]:
  """Pairs each student completion token with a teacher position (the rule in the module
  docstring: k-th selected with k-th selected, truncated to the shorter completion).

  Args:
    student_where: [B, T_s] bool, the student's completion (distillation) tokens.
    teacher_where: [B, T_t] bool, the teacher's, in its own tokenization.

  Returns:
    (teacher_index [B, T_s] int32, the teacher position paired with each student position
     (0 where unpaired); aligned [B, T_s] bool, True where a student token has a partner).

  Example (a 3-token student completion against a 2-token teacher completion):
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> index, aligned = losses.align_completions(
    ...     jnp.array([[False, True, True, True]]),
    ...     jnp.array([[False, False, True, True, False]]))
    >>> index.tolist(), aligned.tolist()
    ([[0, 2, 3, 0]], [[False, True, True, False]])
  """
  name = "align_completions"
  student_where = _checks.as_array(name, "student_where", student_where).astype(bool)
  teacher_where = _checks.as_array(name, "teacher_where", teacher_where).astype(bool)
  if student_where.ndim != 2 or teacher_where.ndim != 2 or (
      student_where.shape[0] != teacher_where.shape[0]):
    raise ValueError(f"{name}: student_where {tuple(student_where.shape)} and teacher_where "
                     f"{tuple(teacher_where.shape)} must be [B, T_s] and [B, T_t]")
  rank = jnp.cumsum(student_where, axis=-1) - 1  # k of the k-th selected student token
  # Teacher positions with the selected ones first, in order (a stable sort on "unselected").
  teacher_order = jnp.argsort(~teacher_where, axis=-1, stable=True)
  teacher_count = jnp.sum(teacher_where, axis=-1, keepdims=True)
  aligned = student_where & (rank < teacher_count)
  safe_rank = jnp.clip(rank, 0, teacher_where.shape[-1] - 1)
  teacher_index = jnp.take_along_axis(teacher_order, safe_rank, axis=-1)
  return jnp.where(aligned, teacher_index, 0).astype(jnp.int32), aligned


def uld(student_logits: ArrayLike, teacher_logits: ArrayLike, *, student_where: ArrayLike,
        teacher_where: ArrayLike, student_temperature: float = 1.0,
        teacher_temperature: float = 1.0) -> jax.Array:
  """Per-token Universal Logit Distillation term (Boizard et al. 2024).

  For the k-th completion token of each student row, `sorted_probability_distance` to the
  k-th completion token of the teacher's row (`align_completions`); the objective is
  `CE + lambda * mean over aligned tokens` (`kdjax.methods.uld`; reduce with the `aligned`
  mask of `align_completions`). The official code averages per sequence, then over the batch;
  kdjax averages over the batch's aligned tokens, as its other LM methods do.

  Args:
    student_logits: [B, T_s, V_s].
    teacher_logits: [B, T_t, V_t] (its own tokenization and vocabulary; T_t = T_s and the same
      masks when both share one tokenizer).
    student_where: [B, T_s] bool, the student's completion tokens.
    teacher_where: [B, T_t] bool, the teacher's.
    student_temperature, teacher_temperature: as in `sorted_probability_distance`.

  Returns:
    [B, T_s] float32; 0 (and zero gradient) at student tokens without a partner.

  Example (one completion token each, at different positions and vocabulary sizes):
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.log(jnp.array([[[0.5, 0.5], [0.4, 0.6]]]))
    >>> t = jnp.log(jnp.array([[[0.2, 0.5, 0.3], [1.0, 1.0, 1.0]]]))
    >>> values = losses.uld(s, t, student_where=jnp.array([[False, True]]),
    ...                     teacher_where=jnp.array([[True, False]]))
    >>> [round(float(v), 4) for v in values[0]]
    [0.0, 0.4]
  """
  name = "uld"
  s = _checks.check_logits(name, "student_logits", student_logits)
  t = _checks.check_logits(name, "teacher_logits", teacher_logits)
  if s.ndim != 3 or t.ndim != 3 or s.shape[0] != t.shape[0]:
    raise ValueError(f"{name}: student_logits {tuple(s.shape)} and teacher_logits "
                     f"{tuple(t.shape)} must be [B, T_s, V_s] and [B, T_t, V_t]")
  _checks.check_where(name, student_where, s.shape[:-1])
  _checks.check_where(name, teacher_where, t.shape[:-1])
  teacher_index, aligned = align_completions(student_where, teacher_where)
  # Masking the teacher's unselected positions before the gather keeps their values (padding
  # may hold anything) out of the loss.
  t = jnp.where(jnp.asarray(teacher_where, bool)[..., None], t, 0)
  paired_teacher = jnp.take_along_axis(t, teacher_index[..., None], axis=1)
  return sorted_probability_distance(s, paired_teacher, student_temperature=student_temperature,
                                     teacher_temperature=teacher_temperature, where=aligned)
