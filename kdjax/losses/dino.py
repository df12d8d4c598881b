"""DINO's self-distillation pieces: centring and sharpening, the multi-view cross-entropy, the
centre update (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021; official code facebookresearch/dino, `main_dino.py` class `DINOLoss`).

The teacher's projection-head outputs `t` are centred by a running centre `c` and sharpened
by a low temperature; the student's `s` use a higher one:

  p_t = softmax((t - c) / T_t),   log p_s = log_softmax(s / T_s)

and the loss is the cross-entropy `-sum_k p_t[k] log p_s[k]` averaged over every pair
(teacher view i, student view j) with i != j (the teacher sees the global views, the student
every view; view i of the teacher and view i of the student are the same crop). The centre
follows an exponential moving average of the teacher's outputs over the global batch of
every teacher view: `c <- m c + (1 - m) mean(t)`.

Pure functions like the other kdjax losses: the caller stops the teacher's gradient and
reduces over the batch; `where` masks padding rows (they are exactly 0, with zero gradient,
and do not move the centre). fp32 math for bf16 inputs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["dino_center_and_sharpen", "dino_cross_entropy", "dino_update_center"]


def dino_center_and_sharpen(teacher_logits: ArrayLike, center: ArrayLike, *,
                            temperature: float = 0.04) -> jax.Array:
  """The teacher's targets `softmax((t - c) / T_t)`.

  Args:
    teacher_logits: [..., K] the teacher's projection-head outputs.
    center: [K] the running centre (`dino_update_center`).
    temperature: the teacher temperature `T_t`; DINO warms it up from 0.04 to 0.07
      (`--warmup_teacher_temp 0.04 --teacher_temp 0.07` in the README's ViT-S runs).

  Returns:
    [..., K] probabilities.

  >>> import jax.numpy as jnp
  >>> from kdjax import losses
  >>> p = losses.dino_center_and_sharpen(jnp.array([[1.0, 0.0]]), jnp.array([0.5, 0.5]),
  ...                             temperature=1.0)
  >>> [round(float(v), 4) for v in p[0]]
  [0.7311, 0.2689]
  """
  name = "dino_center_and_sharpen"
  teacher_logits = _checks.upcast(_checks.check_logits(name, "teacher_logits", teacher_logits))
  center = _checks.upcast(_checks.as_array(name, "center", center))
  if center.shape != teacher_logits.shape[-1:]:
    raise ValueError(f"{name}: center must have shape ({teacher_logits.shape[-1]},) (the "
                     f"teacher's output size), got shape {tuple(center.shape)}")
  _checks.check_positive(name, "temperature", temperature)
  return jax.nn.softmax((teacher_logits - center) / temperature, axis=-1)


def dino_cross_entropy(student_logits: ArrayLike, teacher_probs: ArrayLike, *,
                       temperature: float = 0.1,
                       where: Optional[ArrayLike] = None) -> jax.Array:
  """DINO's multi-view cross-entropy, per example.

  `mean over pairs (i, j), i != j, of -sum_k teacher_probs[i, :, k] * log_softmax(
  student_logits[j] / T_s)[:, k]`: teacher view i and student view i are the same crop and
  are not compared (`DINOLoss.forward`: `if v == iq: continue`, then the sum is divided by the
  number of pairs).

  Args:
    student_logits: [V_s, b, K] the student's head outputs on every view (global views
      first, in the teacher's order, then the local views).
    teacher_probs: [V_t, b, K] the teacher's targets on the global views
      (`dino_center_and_sharpen`), V_t <= V_s.
    temperature: the student temperature `T_s` (0.1, `DINOLoss(student_temp=0.1)`).
    where: optional [b] mask; masked rows are exactly 0, with zero gradient.

  Returns:
    [b] the loss per example.

  >>> import jax.numpy as jnp
  >>> from kdjax import losses
  >>> student = jnp.zeros((3, 1, 2))  # 3 views, 1 example, 2 outputs.
  >>> teacher = jnp.full((2, 1, 2), 0.5)
  >>> [round(float(v), 4) for v in losses.dino_cross_entropy(student, teacher)]  # log 2.
  [0.6931]
  """
  name = "dino_cross_entropy"
  student_logits = _checks.check_logits(name, "student_logits", student_logits)
  teacher_probs = _checks.as_array(name, "teacher_probs", teacher_probs)
  if student_logits.ndim != 3 or teacher_probs.ndim != 3:
    raise ValueError(f"{name}: student_logits and teacher_probs must be [views, b, K], got "
                     f"shapes {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
  if (teacher_probs.shape[1:] != student_logits.shape[1:]
      or teacher_probs.shape[0] > student_logits.shape[0]):
    raise ValueError(
        f"{name}: teacher_probs shape {tuple(teacher_probs.shape)} must be [V_t, b, K] with "
        f"V_t <= V_s for student_logits shape {tuple(student_logits.shape)}")
  num_student, num_teacher = student_logits.shape[0], teacher_probs.shape[0]
  if num_student < 2:
    raise ValueError(f"{name}: needs at least 2 student views (pairs of different views), "
                     f"got shape {tuple(student_logits.shape)}")
  _checks.check_positive(name, "temperature", temperature)
  where = _checks.check_where(name, where, student_logits.shape[1:2])
  student_logits = _checks.upcast(student_logits)
  teacher_probs = _checks.upcast(teacher_probs)
  if where is not None:  # Replaced before any arithmetic: NaN padding gives no NaN gradient.
    student_logits = jnp.where(where[None, :, None], student_logits, 0.0)
    teacher_probs = jnp.where(where[None, :, None], teacher_probs, 0.0)
  log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  # cross[i, j, b] = -sum_k p_t[i, b, k] log p_s[j, b, k].
  cross = -jnp.einsum("ibk,jbk->ijb", teacher_probs, log_student)
  different = ~jnp.eye(num_teacher, num_student, dtype=bool)
  num_pairs = num_teacher * num_student - num_teacher
  per_example = jnp.sum(jnp.where(different[:, :, None], cross, 0.0), axis=(0, 1)) / num_pairs
  return per_example if where is None else jnp.where(where, per_example, 0.0)


def dino_update_center(center: ArrayLike, teacher_logits: ArrayLike, *,
                       momentum: float = 0.9,
                       where: Optional[ArrayLike] = None) -> jax.Array:
  """The centre after one step: `m * c + (1 - m) * mean of t over views and rows`.

  `DINOLoss.update_center` (center_momentum 0.9): the mean is over the global batch of every
  teacher view (the caller gathers it over devices); masked rows are left out of the mean.

  Args:
    center: [K] the current centre.
    teacher_logits: [V_t, b, K] (or [b, K]) the teacher's head outputs, before centring.
    momentum: the centre's EMA momentum `m`, in [0, 1].
    where: optional [b] mask of the rows to average.

  Returns:
    [K] the new centre.

  >>> import jax.numpy as jnp
  >>> from kdjax import losses
  >>> c = losses.dino_update_center(jnp.zeros(2), jnp.array([[[1.0, 2.0], [3.0, 4.0]]]),
  ...                        momentum=0.5)
  >>> [float(v) for v in c]
  [1.0, 1.5]
  """
  name = "dino_update_center"
  teacher_logits = _checks.check_logits(name, "teacher_logits", teacher_logits)
  if teacher_logits.ndim == 2:
    teacher_logits = teacher_logits[None]
  if teacher_logits.ndim != 3:
    raise ValueError(f"{name}: teacher_logits must be [V_t, b, K] or [b, K], got shape "
                     f"{tuple(teacher_logits.shape)}")
  center = _checks.upcast(_checks.as_array(name, "center", center))
  if center.shape != teacher_logits.shape[-1:]:
    raise ValueError(f"{name}: center must have shape ({teacher_logits.shape[-1]},), got "
                     f"shape {tuple(center.shape)}")
  _checks.check_interval(name, "momentum", momentum, 0.0, 1.0)
  where = _checks.check_where(name, where, teacher_logits.shape[1:2])
  if where is None:
    where = jnp.ones(teacher_logits.shape[1:2], bool)
  teacher_logits = jnp.where(where[None, :, None], _checks.upcast(teacher_logits), 0.0)
  count = jnp.maximum(jnp.sum(where) * teacher_logits.shape[0], 1)
  batch_center = jnp.sum(teacher_logits, axis=(0, 1)) / count
  return momentum * center + (1 - momentum) * batch_center
