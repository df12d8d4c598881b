"""Self-distillation targets and losses: PS-KD, TF-KD's virtual teacher and EMA teachers.

Pure `jax.numpy` functions. The target constructions return distributions `[..., C]` (or, for
the EMA teacher, a pytree), the losses per-example values `[...]` with an optional `where`
mask whose entries are exactly 0 with no gradient. Schedules take the optimizer step and
return a float32 scalar, so they run inside a jitted step.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

Numeric = Union[float, jax.Array]

EMA_SCHEDULES = ("cosine", "constant")


def _mask_rows(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Rows of `x` [..., C] where `mask` [...] is False replaced by 0 before any arithmetic."""
  return x if mask is None else jnp.where(mask[..., None], x, 0)


def soft_cross_entropy(student_logits: ArrayLike, targets: ArrayLike, *,
                       where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Cross-entropy of the student against soft targets.

  .. math:: \ell = -\sum_c q_c \log \mathrm{softmax}(z)_c

  PS-KD's loss (`Custom_CrossEntropy_PSKD` of the official code: `(-targets *
  log_softmax(outputs)).mean(0).sum()`, i.e. the batch mean of this value).

  Args:
    student_logits: `[..., C]` student logits.
    targets: `[..., C]` target distributions (rows sum to 1), same shape.
    where: optional `[...]` mask; masked entries are 0 and get no gradient.

  Returns:
    `[...]` per-example loss (float32, or float64 for float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[0.0, 0.0]])
    >>> print(round(float(losses.soft_cross_entropy(z, jnp.array([[0.3, 0.7]]))[0]), 4))
    0.6931

  Reference:
    Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets",
    ICCV 2021.
  """
  name = "soft_cross_entropy"
  z = _checks.upcast(_checks.check_logits(name, "student_logits", student_logits))
  q = _checks.as_array(name, "targets", targets)
  _checks.check_same_shape(name, z, q, "student_logits", "targets")
  mask = _checks.check_where(name, where, z.shape[:-1])
  z, q = _mask_rows(z, mask), _mask_rows(q.astype(z.dtype), mask)
  loss = -jnp.sum(q * jax.nn.log_softmax(z, axis=-1), axis=-1)
  return loss if mask is None else jnp.where(mask, loss, 0.0)


def ps_kd_alpha(step: ArrayLike, *, alpha_T: Numeric, num_steps: int,
                steps_per_epoch: int) -> jax.Array:
  r"""PS-KD's weight of the past predictions at optimizer step `step`.

  .. math:: \alpha_t = \alpha_T \cdot \min\Big(1, \frac{(\lfloor t / S \rfloor + 1)\, S}{N}\Big)

  with `S = steps_per_epoch` and `N = num_steps`: the official
  `alpha_T * (epoch + 1) / end_epoch` (`epoch` counted from 0) with `epoch = t // S` and
  `end_epoch = N / S`, so the weight grows linearly, epoch by epoch, to `alpha_T` in the
  last epoch.

  Args:
    step: scalar optimizer step (int, may be traced).
    alpha_T: the final weight, in [0, 1].
    num_steps: the run's length in optimizer steps, > 0.
    steps_per_epoch: optimizer steps per pass over the training split, > 0.

  Returns:
    float32 scalar.

  Example:
    >>> from kdjax import losses
    >>> # Epoch 1 of 4 (steps 10-19 at 10 steps an epoch): 0.8 * 2 / 4.
    >>> print(round(float(losses.ps_kd_alpha(12, alpha_T=0.8, num_steps=40,
    ...                                      steps_per_epoch=10)), 4))
    0.4

  Reference:
    Kim et al. 2021; official code lgcnsai/PS-KD-Pytorch `main.py`.
  """
  name = "ps_kd_alpha"
  _checks.check_interval(name, "alpha_T", alpha_T, 0.0, 1.0)
  _checks.check_positive(name, "num_steps", num_steps)
  _checks.check_positive(name, "steps_per_epoch", steps_per_epoch)
  epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), steps_per_epoch)
  progress = (epoch + 1).astype(jnp.float32) * steps_per_epoch / num_steps
  return jnp.asarray(alpha_T, jnp.float32) * jnp.minimum(progress, 1.0)


def ps_kd_targets(labels: ArrayLike, previous_probs: ArrayLike, *, alpha: Numeric,
                  seen: Optional[ArrayLike] = None) -> jax.Array:
  r"""PS-KD's progressively refined targets.

  .. math:: q = (1 - \alpha_t)\, \mathrm{onehot}(y) + \alpha_t\, p_{\mathrm{prev}}(x)

  where `p_prev` is the model's own softmax prediction for the example from the previous
  epoch. Where `seen` is False (the example has no stored prediction yet: the first epoch),
  the target is the one-hot label, as the official code's epoch 0.

  Args:
    labels: `[...]` int labels in [0, C).
    previous_probs: `[..., C]` the stored past predictions (rows sum to 1).
    alpha: scalar weight of the past predictions, in [0, 1] (`ps_kd_alpha`).
    seen: optional `[...]` bool, True where `previous_probs` holds a real prediction.

  Returns:
    `[..., C]` target distributions (float32, or float64 for float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> q = losses.ps_kd_targets(jnp.array([0, 1]), jnp.array([[0.5, 0.5], [0.5, 0.5]]),
    ...                          alpha=0.4, seen=jnp.array([True, False]))
    >>> print([[round(float(v), 4) for v in row] for row in q])
    [[0.8, 0.2], [0.0, 1.0]]

  Reference:
    Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets",
    ICCV 2021.
  """
  name = "ps_kd_targets"
  previous = _checks.upcast(_checks.check_logits(name, "previous_probs", previous_probs))
  labels = _checks.check_labels(name, labels, previous.shape[:-1], previous.shape[-1], None)
  _checks.check_interval(name, "alpha", alpha, 0.0, 1.0)
  onehot = jax.nn.one_hot(labels, previous.shape[-1], dtype=previous.dtype)
  alpha = jnp.asarray(alpha, previous.dtype)
  targets = (1 - alpha) * onehot + alpha * previous
  if seen is None:
    return targets
  seen = _checks.as_array(name, "seen", seen)
  if tuple(seen.shape) != tuple(labels.shape):
    raise ValueError(f"{name}: seen must have shape {tuple(labels.shape)} (the labels' "
                     f"shape), got shape {tuple(seen.shape)}")
  return jnp.where(seen.astype(bool)[..., None], targets, onehot)


def virtual_teacher_probs(labels: ArrayLike, num_classes: int, *,
                          correct_prob: Numeric = 0.99,
                          temperature: Numeric = 20.0) -> jax.Array:
  r"""TF-KD's manually designed teacher, softened at temperature `T`.

  .. math::
    u_k = a \text{ if } k = y \text{ else } \frac{1 - a}{C - 1}, \qquad
    p^d = \mathrm{softmax}(u / T)

  As the official `loss_kd_regularization`, the softmax is applied to the designed
  probabilities `u` themselves (at `T = 20` this is close to uniform, a label-smoothing
  regulariser), not to logits.

  Args:
    labels: `[...]` int labels in [0, C).
    num_classes: `C >= 2`.
    correct_prob: `a`, the designed probability of the correct class, in (0, 1) (official:
      0.99, hard-coded in `my_loss_function.py`).
    temperature: `T > 0` (official: `reg_temperature` 20).

  Returns:
    `[..., C]` float32 distributions.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> p = losses.virtual_teacher_probs(jnp.array([1]), 3, correct_prob=0.9, temperature=1.0)
    >>> # softmax([0.05, 0.9, 0.05])
    >>> print(jnp.round(p, 4))
    [[0.2304 0.5391 0.2304]]

  Reference:
    Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization",
    CVPR 2020; official code yuanli2333/Teacher-free-Knowledge-Distillation.
  """
  name = "virtual_teacher_probs"
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
    raise ValueError(f"{name}: num_classes must be an int >= 2, got {num_classes!r}")
  _checks.check_interval(name, "correct_prob", correct_prob, 0.0, 1.0)
  _checks.check_positive(name, "temperature", temperature)
  labels = _checks.as_array(name, "labels", labels)
  labels = _checks.check_labels(name, labels, labels.shape, num_classes, None)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  designed = onehot * correct_prob + (1 - onehot) * (1 - correct_prob) / (num_classes - 1)
  return jax.nn.softmax(designed / temperature, axis=-1)


def tf_kd_virtual(student_logits: ArrayLike, labels: ArrayLike, *,
                  correct_prob: Numeric = 0.99, temperature: Numeric = 20.0,
                  where: Optional[ArrayLike] = None) -> jax.Array:
  r"""KL from TF-KD's virtual teacher to the student.

  .. math:: \ell = \mathrm{KL}(p^d \,\|\, \mathrm{softmax}(z))

  with `p^d = virtual_teacher_probs(labels, C, correct_prob, temperature)`. The student is
  at temperature 1 and there is no `T**2` factor, as the official `loss_kd_regularization`
  (whose `nn.KLDivLoss()` further averages over the classes: the method divides by `C`).

  Args:
    student_logits: `[..., C]` student logits.
    labels: `[...]` int labels.
    correct_prob: `a` in (0, 1).
    temperature: `T > 0` of the virtual teacher.
    where: optional `[...]` mask; masked entries are 0 and get no gradient.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> # A student equal to the virtual teacher: KL 0.
    >>> p = losses.virtual_teacher_probs(jnp.array([0]), 4)
    >>> print(round(float(losses.tf_kd_virtual(jnp.log(p), jnp.array([0]))[0]), 6))
    0.0

  Reference:
    Yuan et al. 2020 (Tf-KD_reg).
  """
  name = "tf_kd_virtual"
  z = _checks.upcast(_checks.check_logits(name, "student_logits", student_logits,
                                          min_classes=2))
  mask = _checks.check_where(name, where, z.shape[:-1])
  labels = _checks.check_labels(name, labels, z.shape[:-1], z.shape[-1], mask)
  labels = labels if mask is None else jnp.where(mask, labels, 0)
  z = _mask_rows(z, mask)
  p = virtual_teacher_probs(labels, z.shape[-1], correct_prob=correct_prob,
                            temperature=temperature).astype(z.dtype)
  loss = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(z, axis=-1)), axis=-1)
  return loss if mask is None else jnp.where(mask, loss, 0.0)


def ema_momentum(step: ArrayLike, *, momentum: Numeric, momentum_end: Numeric = 1.0,
                 num_steps: int = 1, schedule: str = "cosine") -> jax.Array:
  r"""The EMA teacher's momentum at optimizer step `step`.

  'cosine' (BYOL, Grill et al. 2020; DINO's `cosine_scheduler`, Caron et al. 2021):

  .. math:: m_t = m_{end} - (m_{end} - m_0)\,\frac{1 + \cos(\pi \min(t, N) / N)}{2}

  from `m_0 = momentum` at step 0 to `momentum_end` at `N = num_steps`. 'constant': `m_0`
  throughout (mean teacher, Tarvainen & Valpola 2017).

  Args:
    step: scalar optimizer step (may be traced).
    momentum: `m_0` in [0, 1].
    momentum_end: `m_end` in [0, 1] (cosine only).
    num_steps: `N > 0` (cosine only).
    schedule: 'cosine' or 'constant'.

  Returns:
    float32 scalar.

  Example:
    >>> from kdjax import losses
    >>> print(round(float(losses.ema_momentum(50, momentum=0.996, momentum_end=1.0,
    ...                                       num_steps=100)), 4))
    0.998

  Reference:
    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020; Caron et al., "Emerging
    Properties in Self-Supervised Vision Transformers", ICCV 2021.
  """
  name = "ema_momentum"
  if schedule not in EMA_SCHEDULES:
    raise ValueError(f"{name}: schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
  _checks.check_interval(name, "momentum", momentum, 0.0, 1.0)
  m0 = jnp.asarray(momentum, jnp.float32)
  if schedule == "constant":
    return m0
  _checks.check_interval(name, "momentum_end", momentum_end, 0.0, 1.0)
  _checks.check_positive(name, "num_steps", num_steps)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32), num_steps) / num_steps
  m_end = jnp.asarray(momentum_end, jnp.float32)
  return m_end - (m_end - m0) * (1 + jnp.cos(math.pi * progress)) / 2


def ema_update(teacher: Any, student: Any, momentum: Numeric) -> Any:
  r"""One EMA step of a teacher pytree towards the student's.

  .. math:: \theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_s

  on every floating leaf (params and BatchNorm statistics); non-floating leaves (counters)
  take the student's value. Leaves keep the teacher's dtype.

  Args:
    teacher: pytree of arrays.
    student: pytree of the same structure and shapes.
    momentum: scalar `m` in [0, 1] (may be traced).

  Returns:
    The new teacher pytree.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> new = losses.ema_update({'w': jnp.array([1.0])}, {'w': jnp.array([3.0])}, 0.75)
    >>> print(new['w'].tolist())
    [1.5]

  Reference:
    Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017.
  """
  name = "ema_update"
  _checks.check_interval(name, "momentum", momentum, 0.0, 1.0)
  teacher_structure = jax.tree.structure(teacher)
  if jax.tree.structure(student) != teacher_structure:
    raise ValueError(f"{name}: teacher and student pytrees differ: {teacher_structure} vs "
                     f"{jax.tree.structure(student)}")

  def move(t, s):
    t, s = jnp.asarray(t), jnp.asarray(s)
    if t.shape != s.shape:
      raise ValueError(f"{name}: a teacher leaf of shape {t.shape} meets a student leaf of "
                       f"shape {s.shape}")
    if not jnp.issubdtype(t.dtype, jnp.floating):
      return s.astype(t.dtype)
    m = jnp.asarray(momentum, jnp.float32)
    return (m * t.astype(jnp.float32) + (1 - m) * s.astype(jnp.float32)).astype(t.dtype)

  return jax.tree.map(move, teacher, student)
