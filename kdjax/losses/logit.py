"""Logit distillation losses: pure, unreduced, optax-style functions.

Every loss takes `(student_logits, teacher_logits, ...)` of shape `[..., C]`
(`[B, C]` for classifiers, `[B, T, V]` for language models), keyword-only
hyper-parameters, and an optional `where` mask of shape `[...]`. It returns one
value per example / token, shape `logits.shape[:-1]`, and leaves the reduction to
the caller. Masked entries are exactly 0 and receive exactly zero gradient, even
when the masked rows hold `inf` or `NaN` (the inputs are replaced before any
arithmetic, not only the output).

Numerics: bf16/f16 inputs are upcast to float32 first (float64 stays float64);
log-probabilities always come from `jax.nn.log_softmax`; products `p * log p`
follow the `0 * log 0 = 0` convention without producing NaN values or gradients,
so `-inf` logits (masked vocabulary entries shared by teacher and student) are
fine. No loss stops the teacher's gradient; the train step does that.

Notation in the docstrings: `p = softmax(z / T)`,
`KL(a || b) = sum_c a_c (log a_c - log b_c)`, `s` student, `t` teacher.

Conventions differ by family, each as its reference code has it (docs/losses.md tabulates
them): the classifier losses `kd`, `dkd`, `dist`, `sparse_kd`, `multi_teacher_kd` (and NKD's
non-target term) multiply by `T**2` and default to their papers' temperatures (`kd` T 4); the
token-level divergences `forward_kl`, `reverse_kl`, `generalized_jsd`, `skew_*`,
`total_variation` have no `T**2` and default to T 1 (GKD / TRL / DistiLLM). So
`forward_kl(s, t, temperature=T) * T**2 == kd(s, t, temperature=T)`. A method's defaults
(`kdjax.methods`, e.g. DIST's CIFAR recipe beta = gamma = 2, T 4) may differ from its loss
function's (DIST's ImageNet setting beta = gamma = T = 1).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

Numeric = Union[float, jax.Array]

__all__ = [
    "kd",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
    "dkd",
    "standardize_logits",
    "nkd",
    "taid",
    "sparse_kd",
    "multi_teacher_kd",
]


# ----------------------------------------------------------------------------
# Numerically safe building blocks (private).
# ----------------------------------------------------------------------------


def _kl_from_log(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """sum_c p_c (log p_c - log q_c) over the last axis, with 0 log 0 = 0.

  Entries with p_c == 0 (including log p_c == -inf, and p_c underflowing) are
  dropped *before* the multiplication, so neither the value nor the gradient
  sees `0 * (-inf - -inf)`.
  """
  p = jnp.exp(log_p)
  support = p > 0
  diff = jnp.where(support, log_p - log_q, 0.0)
  return jnp.sum(p * diff, axis=-1)


def _cross_entropy_from_log(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """-sum_c p_c log q_c over the last axis, with 0 log 0 = 0."""
  p = jnp.exp(log_p)
  support = p > 0
  return -jnp.sum(p * jnp.where(support, log_q, 0.0), axis=-1)


def _log_mixture(log_a: jax.Array, log_b: jax.Array,
                 weight_a: Numeric) -> jax.Array:
  """log(w * a + (1 - w) * b) from log a and log b, stably.

  Where both are -inf (a class masked out of both distributions) the inputs of
  logaddexp are replaced first so its gradient cannot be NaN; the result there
  is -inf, which `_kl_from_log` ignores because the class has zero mass.
  """
  both_empty = jnp.isneginf(log_a) & jnp.isneginf(log_b)
  log_a = jnp.where(both_empty, 0.0, log_a)
  log_b = jnp.where(both_empty, 0.0, log_b)
  mixed = jnp.logaddexp(jnp.log(weight_a) + log_a,
                        jnp.log1p(-weight_a) + log_b)
  return jnp.where(both_empty, -jnp.inf, mixed)


def _mask_inputs(mask: Optional[jax.Array], *arrays: jax.Array):
  """Upcasts, then replaces masked rows by 0 so inf/NaN there cannot leak."""
  arrays = tuple(_checks.upcast(a) for a in arrays)
  if mask is None:
    return arrays
  return tuple(
      jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, 0)
      for a in arrays)


def _mask_output(mask: Optional[jax.Array], loss: jax.Array) -> jax.Array:
  return loss if mask is None else jnp.where(mask, loss, 0.0)


def _pair(name: str, student_logits: ArrayLike, teacher_logits: ArrayLike,
          where: Optional[ArrayLike], temperature: Numeric, *,
          min_classes: int = 1):
  """Validates a (student, teacher, where, temperature) quadruple."""
  student_logits = _checks.check_logits(name, "student_logits", student_logits,
                                        min_classes=min_classes)
  teacher_logits = _checks.check_logits(name, "teacher_logits", teacher_logits,
                                        min_classes=min_classes)
  _checks.check_same_shape(name, student_logits, teacher_logits)
  _checks.check_positive(name, "temperature", temperature)
  mask = _checks.check_where(name, where, student_logits.shape[:-1])
  return student_logits, teacher_logits, mask


def _log_probs(name: str, student_logits, teacher_logits, where, temperature):
  """Validated, masked, upcast log-probabilities at `temperature`."""
  s, t, mask = _pair(name, student_logits, teacher_logits, where, temperature)
  s, t = _mask_inputs(mask, s, t)
  return (jax.nn.log_softmax(s / temperature, axis=-1),
          jax.nn.log_softmax(t / temperature, axis=-1), mask)


# ----------------------------------------------------------------------------
# KL family.
# ----------------------------------------------------------------------------


def kd(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
       temperature: Numeric = 4.0,
       where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Hinton knowledge distillation: temperature-scaled forward KL.

  .. math::
    \ell = T^2 \, \mathrm{KL}(p_t \,\|\, p_s), \qquad p = \mathrm{softmax}(z / T)

  The `T**2` factor keeps the gradient scale independent of the temperature.

  Args:
    student_logits: `[..., C]` student logits (any float dtype).
    teacher_logits: `[..., C]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask (bool or 0/1); masked entries are 0 and get no
      gradient.

  Returns:
    `[...]` per-example loss (float32, or float64 for float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.array([[3.0, 2.0, 1.0]])
    >>> # log p_t - log p_s = t - s = (2, 0, -2); 2 * (0.6652 - 0.0900)
    >>> print(round(float(losses.kd(s, t, temperature=1.0).sum()), 4))
    1.1504

  Reference:
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
  """
  log_ps, log_pt, mask = _log_probs("kd", student_logits, teacher_logits,
                                    where, temperature)
  return _mask_output(mask, temperature**2 * _kl_from_log(log_pt, log_ps))


def forward_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
               temperature: Numeric = 1.0,
               where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Forward KL, mean-seeking: `KL(p_t || p_s)`.

  .. math:: \ell = \sum_c p_{t,c} (\log p_{t,c} - \log p_{s,c})

  Unlike `kd` there is no `T**2` factor.

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.array([[3.0, 2.0, 1.0]])
    >>> print(round(float(losses.forward_kl(s, t).sum()), 4))
    1.1504

  Reference:
    Kullback & Leibler, 1951; as a KD objective see Agarwal et al., "On-Policy
    Distillation of Language Models" (GKD), ICLR 2024.
  """
  log_ps, log_pt, mask = _log_probs("forward_kl", student_logits,
                                    teacher_logits, where, temperature)
  return _mask_output(mask, _kl_from_log(log_pt, log_ps))


def reverse_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
               temperature: Numeric = 1.0,
               where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Reverse KL, mode-seeking: `KL(p_s || p_t)`.

  .. math:: \ell = \sum_c p_{s,c} (\log p_{s,c} - \log p_{t,c})

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, 0.0]])
    >>> t = jnp.array([[0.0, jnp.log(3.0)]])
    >>> print(round(float(losses.reverse_kl(s, t).sum()), 4))
    0.1438

  Reference:
    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
    ICLR 2024.
  """
  log_ps, log_pt, mask = _log_probs("reverse_kl", student_logits,
                                    teacher_logits, where, temperature)
  return _mask_output(mask, _kl_from_log(log_ps, log_pt))


def generalized_jsd(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                    beta: Numeric = 0.5, temperature: Numeric = 1.0,
                    where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Generalized Jensen-Shannon divergence (GKD / TRL convention).

  .. math::
    m = \beta p_t + (1 - \beta) p_s, \qquad
    \ell = \beta \mathrm{KL}(p_t \| m) + (1 - \beta) \mathrm{KL}(p_s \| m)

  The mixture formula tends to 0 at both ends, so (as TRL's
  `generalized_jsd_loss` does) the endpoints are special-cased: `beta=0` returns
  `forward_kl` and `beta=1` returns `reverse_kl`. `log m` is computed with
  `logaddexp(log beta + log p_t, log(1 - beta) + log p_s)`. A traced `beta`
  selects between the three with `jnp.where`, so all three are computed.

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    beta: interpolation weight in `[0, 1]`; 0.5 is the symmetric JSD.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, -jnp.inf]])   # student puts all mass on class 0
    >>> t = jnp.array([[-jnp.inf, 0.0]])   # teacher on class 1: JSD = log 2
    >>> print(round(float(losses.generalized_jsd(s, t).sum()), 4))
    0.6931

  Reference:
    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR 2024.
  """
  name = "generalized_jsd"
  _checks.check_interval(name, "beta", beta, 0.0, 1.0)
  log_ps, log_pt, mask = _log_probs(name, student_logits, teacher_logits,
                                    where, temperature)
  if _checks.is_python_number(beta):
    if beta == 0:
      return _mask_output(mask, _kl_from_log(log_pt, log_ps))
    if beta == 1:
      return _mask_output(mask, _kl_from_log(log_ps, log_pt))
    log_m = _log_mixture(log_pt, log_ps, beta)
    loss = (beta * _kl_from_log(log_pt, log_m)
            + (1 - beta) * _kl_from_log(log_ps, log_m))
    return _mask_output(mask, loss)
  beta = jnp.asarray(beta, log_ps.dtype)
  log_m = _log_mixture(log_pt, log_ps, beta)
  mixed = (beta * _kl_from_log(log_pt, log_m)
           + (1 - beta) * _kl_from_log(log_ps, log_m))
  loss = jnp.where(beta == 0, _kl_from_log(log_pt, log_ps),
                   jnp.where(beta == 1, _kl_from_log(log_ps, log_pt), mixed))
  return _mask_output(mask, loss)


def skew_forward_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                    alpha: Numeric = 0.1, temperature: Numeric = 1.0,
                    where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Skew forward KL (DistiLLM): KL from the teacher to a teacher-student mix.

  .. math:: \ell = \mathrm{KL}(p_t \,\|\, \alpha p_t + (1 - \alpha) p_s)

  Mixing some teacher mass into the second argument bounds the loss (by
  `-log alpha`) and its gradients where the student assigns ~0 probability.
  `alpha=0` is `forward_kl`.

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    alpha: skew in `[0, 1)`.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, -jnp.inf]])
    >>> t = jnp.array([[-jnp.inf, 0.0]])   # disjoint supports: -log(alpha)
    >>> print(round(float(losses.skew_forward_kl(s, t, alpha=0.1).sum()), 4))
    2.3026

  Reference:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024.
  """
  name = "skew_forward_kl"
  _checks.check_interval(name, "alpha", alpha, 0.0, 1.0, high_inclusive=False)
  log_ps, log_pt, mask = _log_probs(name, student_logits, teacher_logits,
                                    where, temperature)
  if _checks.is_python_number(alpha) and alpha == 0:
    return _mask_output(mask, _kl_from_log(log_pt, log_ps))
  log_mix = _log_mixture(log_pt, log_ps, alpha)
  return _mask_output(mask, _kl_from_log(log_pt, log_mix))


def skew_reverse_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                    alpha: Numeric = 0.1, temperature: Numeric = 1.0,
                    where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Skew reverse KL (DistiLLM): KL from the student to a student-teacher mix.

  .. math:: \ell = \mathrm{KL}(p_s \,\|\, \alpha p_s + (1 - \alpha) p_t)

  `alpha=0` is `reverse_kl`.

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    alpha: skew in `[0, 1)`.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, -jnp.inf]])
    >>> t = jnp.array([[-jnp.inf, 0.0]])
    >>> print(round(float(losses.skew_reverse_kl(s, t, alpha=0.5).sum()), 4))
    0.6931

  Reference:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024.
  """
  name = "skew_reverse_kl"
  _checks.check_interval(name, "alpha", alpha, 0.0, 1.0, high_inclusive=False)
  log_ps, log_pt, mask = _log_probs(name, student_logits, teacher_logits,
                                    where, temperature)
  if _checks.is_python_number(alpha) and alpha == 0:
    return _mask_output(mask, _kl_from_log(log_ps, log_pt))
  log_mix = _log_mixture(log_ps, log_pt, alpha)
  return _mask_output(mask, _kl_from_log(log_ps, log_mix))


def total_variation(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                    temperature: Numeric = 1.0,
                    where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Total variation distance between teacher and student distributions.

  .. math:: \ell = \tfrac12 \sum_c |p_{t,c} - p_{s,c}|

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss in `[0, 1]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, 0.0]])             # p_s = (0.5, 0.5)
    >>> t = jnp.array([[0.0, jnp.log(3.0)]])    # p_t = (0.25, 0.75)
    >>> print(round(float(losses.total_variation(s, t).sum()), 4))
    0.25

  Reference:
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation", ACL 2023.
  """
  log_ps, log_pt, mask = _log_probs("total_variation", student_logits,
                                    teacher_logits, where, temperature)
  loss = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps)), axis=-1)
  return _mask_output(mask, loss)


# ----------------------------------------------------------------------------
# Label-aware losses.
# ----------------------------------------------------------------------------


def _target_split(logits: jax.Array, onehot: jax.Array):
  """Returns (log [p_target, p_non_target], log q over non-target classes).

  `q` is the softmax with the target class removed, done exactly by giving the
  target logit -inf (mdistiller subtracts 1000 instead).
  """
  log_all = jax.nn.logsumexp(logits, axis=-1)
  non_target = jnp.where(onehot, -jnp.inf, logits)
  log_non_target_total = jax.nn.logsumexp(non_target, axis=-1)
  target_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  log_binary = jnp.stack(
      [target_logit - log_all, log_non_target_total - log_all], axis=-1)
  log_q = non_target - log_non_target_total[..., None]
  return log_binary, log_q


def _labelled(name, student_logits, teacher_logits, labels, where,
              temperature):
  s, t, mask = _pair(name, student_logits, teacher_logits, where, temperature,
                     min_classes=2)
  num_classes = s.shape[-1]
  labels = _checks.check_labels(name, labels, s.shape[:-1], num_classes, mask)
  s, t = _mask_inputs(mask, s, t)
  if mask is not None:
    labels = jnp.where(mask, labels, 0)  # e.g. -100 "ignore" labels
  onehot = labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)
  return s, t, onehot, mask


def dkd(student_logits: ArrayLike, teacher_logits: ArrayLike,
        labels: ArrayLike, *, alpha: Numeric = 1.0, beta: Numeric = 8.0,
        temperature: Numeric = 4.0,
        where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Decoupled knowledge distillation: target (TCKD) + non-target (NCKD) KD.

  With `b = [p_y, 1 - p_y]` the binary target / non-target split of
  `p = softmax(z / T)` and `q = softmax` over the non-target classes only,

  .. math::
    \ell = T^2 (\alpha \, \mathrm{KL}(b_t \| b_s)
                + \beta \, \mathrm{KL}(q_t \| q_s)).

  Since `KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_{t,y}) KL(q_t || q_s)`,
  `kd == dkd(alpha=1, beta=0) + (1 - p_{t,y}) * dkd(alpha=0, beta=1)`: classical
  KD down-weights NCKD by the teacher's non-target mass; DKD decouples it.

  Args:
    student_logits: `[..., C]` student logits, `C >= 2`.
    teacher_logits: `[..., C]` teacher logits, same shape.
    labels: `[...]` integer ground-truth classes in `[0, C)`. Checked when concrete; under
      `jit` a loss cannot raise, and a label outside `[0, C)` would give an all-zero
      one-hot target, so kdjax's input pipeline refuses such labels when a dataset opens.
    alpha: TCKD weight.
    beta: NCKD weight.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask; labels at masked positions are ignored (they
      may be e.g. -100).

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.array([[3.0, 2.0, 1.0]])
    >>> y = jnp.array([0])
    >>> # TCKD = 0.6652 * 2 - 0.3348 * 1, NCKD = 0.7311 - 0.2689
    >>> print(round(float(losses.dkd(s, t, y, temperature=1.0).sum()), 4))
    4.6927

  Reference:
    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
  """
  s, t, onehot, mask = _labelled("dkd", student_logits, teacher_logits, labels,
                                 where, temperature)
  log_bs, log_qs = _target_split(s / temperature, onehot)
  log_bt, log_qt = _target_split(t / temperature, onehot)
  tckd = _kl_from_log(log_bt, log_bs)
  nckd = _kl_from_log(log_qt, log_qs)
  return _mask_output(mask, temperature**2 * (alpha * tckd + beta * nckd))


def nkd(student_logits: ArrayLike, teacher_logits: ArrayLike,
        labels: ArrayLike, *, temperature: Numeric = 1.0,
        gamma: Numeric = 1.5,
        where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Normalized KD: target cross-entropy + normalized non-target KD.

  Following the official implementation (yzd-v/cls_KD,
  `mmcls/models/dis_losses/nkd.py`, class `NKDLoss`):

  .. math::
    \ell = -p_{t,y} \log p_{s,y}
           - \gamma T^2 \sum_{k \ne y} q_{t,k} \log q_{s,k}

  where `p = softmax(z)` at temperature 1 (the target term ignores `T`) and
  `q = softmax(z / T)` over the non-target classes (target removed, i.e. the
  non-target distribution renormalized). Both terms are cross-entropies, as in
  the official code, so the loss is not 0 when student equals teacher (the
  difference to a KL is the teacher entropy, which has no student gradient).
  The official code detaches `p_{t,y}`; here, as for every kdjax loss, the
  caller stops the teacher's gradient.

  Args:
    student_logits: `[..., C]` student logits, `C >= 2`.
    teacher_logits: `[..., C]` teacher logits, same shape.
    labels: `[...]` integer ground-truth classes in `[0, C)`. Checked when concrete; under
      `jit` a loss cannot raise, and a label outside `[0, C)` would give an all-zero
      one-hot target, so kdjax's input pipeline refuses such labels when a dataset opens.
    temperature: temperature `T > 0` of the non-target term.
    gamma: weight of the non-target term.
    where: optional `[...]` mask; labels at masked positions are ignored.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, 0.0, 0.0]])
    >>> t = jnp.array([[0.0, 0.0, 0.0]])
    >>> y = jnp.array([0])
    >>> # (1/3) log 3 + 1.5 * log 2
    >>> print(round(float(losses.nkd(s, t, y).sum()), 4))
    1.4059

  Reference:
    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023.
  """
  s, t, onehot, mask = _labelled("nkd", student_logits, teacher_logits, labels,
                                 where, temperature)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  teacher_target_prob = jnp.sum(
      jnp.where(onehot, jax.nn.softmax(t, axis=-1), 0.0), axis=-1)
  student_target_log_prob = jnp.sum(jnp.where(onehot, log_ps, 0.0), axis=-1)
  target_term = -teacher_target_prob * student_target_log_prob
  _, log_qs = _target_split(s / temperature, onehot)
  _, log_qt = _target_split(t / temperature, onehot)
  non_target_term = gamma * temperature**2 * _cross_entropy_from_log(
      log_qt, log_qs)
  return _mask_output(mask, target_term + non_target_term)


# ----------------------------------------------------------------------------
# Other logit transforms and variants.
# ----------------------------------------------------------------------------


def standardize_logits(logits: ArrayLike, *, eps: Numeric = 1e-7
                       ) -> jax.Array:
  r"""Z-scores logits over the class axis (logit standardization).

  .. math:: \tilde z = (z - \mathrm{mean}(z)) / (\mathrm{std}(z) + \epsilon)

  with the unbiased standard deviation (`ddof=1`, as `torch.std`). Meant to be
  applied to both student and teacher before `kd`, e.g.
  `kd(standardize_logits(s), standardize_logits(t), temperature=2.0)`, so the
  student matches the teacher's logit *relations* rather than its scale. A
  constant row maps to zeros with a finite gradient. Logits must be finite
  (a `-inf` vocabulary mask makes the mean -inf; apply the mask afterwards).

  Args:
    logits: `[..., C]` logits, `C >= 2`.
    eps: added to the standard deviation.

  Returns:
    `[..., C]` standardized logits (float32 for bf16/f16/f32 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = losses.standardize_logits(jnp.array([1.0, 2.0, 3.0]))
    >>> print([round(float(v), 4) for v in z])
    [-1.0, 0.0, 1.0]

  Reference:
    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.
  """
  name = "standardize_logits"
  logits = _checks.check_logits(name, "logits", logits, min_classes=2)
  z = _checks.upcast(logits)
  centered = z - jnp.mean(z, axis=-1, keepdims=True)
  variance = jnp.sum(centered**2, axis=-1, keepdims=True) / (z.shape[-1] - 1)
  positive = variance > 0
  # Double where: sqrt has an infinite derivative at 0 (constant rows).
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
  return centered / (std + eps)


def taid(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
         t: Numeric, where: Optional[ArrayLike] = None) -> jax.Array:
  r"""TAID: KL from a student-teacher interpolation to the student.

  .. math::
    p_t^{(\tau)} = \mathrm{softmax}((1 - \tau)\, \mathrm{sg}(z_s) + \tau z_t),
    \qquad \ell = \mathrm{KL}(p_t^{(\tau)} \,\|\, p_s)

  The interpolation is in logit space and uses the *detached* student logits
  (`sg` = stop-gradient), as in the official implementation (SakanaAI/TAID,
  `TAID.compute_loss`: `(1 - t) * logits.detach() + t * teacher_logits`). The
  official code returns the cross-entropy `-sum p log p_s`; this returns the KL,
  which differs by the entropy of the target, a term with no student gradient.
  The schedule of `t` (from `t_start` towards 1, adapted to the loss) belongs to
  the method, not the loss.

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[..., C]` teacher logits, same shape.
    t: interpolation coefficient in `[0, 1]` (a Python number or a traced
      scalar; only Python numbers are range-checked).
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, 0.0]])
    >>> teacher = jnp.array([[0.0, 2.0 * jnp.log(3.0)]])
    >>> # target softmax([0, log 3]) = (1/4, 3/4), as in the reverse_kl example
    >>> print(round(float(losses.taid(s, teacher, t=0.5).sum()), 4))
    0.1308

  Reference:
    Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for
    Efficient Knowledge Transfer in Language Models", ICLR 2025.
  """
  name = "taid"
  _checks.check_interval(name, "t", t, 0.0, 1.0)
  if not _checks.is_python_number(t):
    t_arr = _checks.as_array(name, "t", t)
    if t_arr.ndim != 0:
      raise ValueError(f"{name}: t must be a scalar, got shape "
                       f"{tuple(t_arr.shape)}")
  s, teacher, mask = _pair(name, student_logits, teacher_logits, where, 1.0)
  s, teacher = _mask_inputs(mask, s, teacher)
  t = jnp.asarray(t, s.dtype)
  # Guard the zero weights so that 0 * (-inf) cannot turn masked vocabulary
  # entries into NaN at t == 0 or t == 1.
  student_part = jnp.where(t == 1, 0.0, (1 - t) * jax.lax.stop_gradient(s))
  teacher_part = jnp.where(t == 0, 0.0, t * teacher)
  log_target = jax.nn.log_softmax(student_part + teacher_part, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  return _mask_output(mask, _kl_from_log(log_target, log_ps))


def sparse_kd(student_logits: ArrayLike, teacher_topk_logits: ArrayLike,
              teacher_topk_indices: ArrayLike, *,
              temperature: Numeric = 1.0,
              where: Optional[ArrayLike] = None) -> jax.Array:
  r"""KD against a teacher stored as its top-k logits (offline / cached KD).

  .. math::
    \ell = T^2 \sum_{j=1}^{k} \tilde p_{t,j}
           (\log \tilde p_{t,j} - \log p_{s, i_j}),
    \quad \tilde p_t = \mathrm{softmax}(z_t^{\text{top-}k} / T),
    \quad p_s = \mathrm{softmax}(z_s / T) \text{ over all } V \text{ classes}.

  Bias: the teacher's tail mass (the classes outside the top k) is dropped and
  the kept probabilities are renormalised, so the target is sharper than the
  real teacher and the student is never told how to spread the tail. It equals
  `kd` only when `k = V` (the indices a permutation of all classes). Indices
  are assumed distinct; `-inf` top-k logits (padding) are allowed and ignored.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_topk_logits: `[..., k]` teacher logits of the kept classes.
    teacher_topk_indices: `[..., k]` integer class ids in `[0, V)`.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    >>> topk = jnp.array([[5.0, 5.0]])      # teacher: half/half on classes 2, 0
    >>> idx = jnp.array([[2, 0]])
    >>> # 2 * 0.5 * (log 0.5 - log 0.25) = log 2
    >>> print(round(float(losses.sparse_kd(s, topk, idx).sum()), 4))
    0.6931

  Reference:
    Raman et al., "For Distillation, Tokens Are Not All You Need" (top-k
    logit caching), NeurIPS 2023 workshop; Hinton et al., 2015.
  """
  name = "sparse_kd"
  s = _checks.check_logits(name, "student_logits", student_logits)
  topk = _checks.check_logits(name, "teacher_topk_logits", teacher_topk_logits)
  indices = _checks.as_array(name, "teacher_topk_indices",
                             teacher_topk_indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(
        f"{name}: teacher_topk_indices must have an integer dtype, got dtype "
        f"{indices.dtype} with shape {tuple(indices.shape)}")
  if tuple(indices.shape) != tuple(topk.shape):
    raise ValueError(
        f"{name}: teacher_topk_indices shape {tuple(indices.shape)} must equal "
        f"teacher_topk_logits shape {tuple(topk.shape)}")
  if topk.ndim != s.ndim or topk.shape[:-1] != s.shape[:-1]:
    raise ValueError(
        f"{name}: teacher_topk_logits shape {tuple(topk.shape)} must be "
        f"student_logits shape {tuple(s.shape)} with the last axis replaced "
        f"by k")
  vocab = s.shape[-1]
  if topk.shape[-1] > vocab:
    raise ValueError(
        f"{name}: k={topk.shape[-1]} kept teacher logits exceed the student "
        f"vocabulary V={vocab} (shapes {tuple(topk.shape)} and "
        f"{tuple(s.shape)})")
  _checks.check_positive(name, "temperature", temperature)
  mask = _checks.check_where(name, where, s.shape[:-1])
  _checks.check_int_range(name, "teacher_topk_indices", indices, vocab, mask)
  s, topk = _mask_inputs(mask, s, topk)
  if mask is not None:
    indices = jnp.where(mask[..., None], indices, 0)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_ps_kept = jnp.take_along_axis(log_ps, indices, axis=-1)
  log_pt = jax.nn.log_softmax(topk / temperature, axis=-1)
  return _mask_output(mask, temperature**2 * _kl_from_log(log_pt, log_ps_kept))


def multi_teacher_kd(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                     weights: Optional[Union[Sequence[Numeric],
                                             jax.Array]] = None,
                     temperatures: Union[Numeric, Sequence[Numeric]] = 4.0,
                     where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Weighted sum of `kd` losses against several teachers.

  .. math::
    \ell = \sum_{n=1}^{N} w_n T_n^2 \,
           \mathrm{KL}(\mathrm{softmax}(z_{t_n} / T_n) \,\|\,
                       \mathrm{softmax}(z_s / T_n))

  Args:
    student_logits: `[..., C]` student logits.
    teacher_logits: `[N, ..., C]` logits of `N` teachers stacked on a new
      leading axis.
    weights: `N` weights (sequence or `[N]` array); default uniform `1 / N`.
    temperatures: one temperature for all teachers or `N` of them.
    where: optional `[...]` mask.

  Returns:
    `[...]` per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.stack([jnp.array([[3.0, 2.0, 1.0]]), s])  # 2nd teacher = student
    >>> loss = losses.multi_teacher_kd(s, t, temperatures=1.0)
    >>> print(round(float(loss.sum()), 4))    # (1.1504 + 0) / 2
    0.5752

  Reference:
    You et al., "Learning from Multiple Teacher Networks", KDD 2017.
  """
  name = "multi_teacher_kd"
  s = _checks.check_logits(name, "student_logits", student_logits)
  t = _checks.check_logits(name, "teacher_logits", teacher_logits)
  if t.ndim != s.ndim + 1:
    raise ValueError(
        f"{name}: teacher_logits must have shape [N_teachers, "
        f"*student_logits.shape] = [N, {', '.join(map(str, s.shape))}], got "
        f"shape {tuple(t.shape)} for student_logits shape {tuple(s.shape)}")
  num_teachers = t.shape[0]
  if num_teachers < 1:
    raise ValueError(f"{name}: teacher_logits holds no teacher, shape "
                     f"{tuple(t.shape)}")
  _checks.check_same_shape(name, s, t[0], "student_logits",
                           "teacher_logits[n]")
  temperatures = _checks.broadcast_hyper(name, "temperatures", temperatures,
                                         num_teachers)
  for temperature in temperatures:
    _checks.check_positive(name, "temperatures", temperature)
  if weights is None:
    weights = (1.0 / num_teachers,) * num_teachers
  else:
    weights = _checks.broadcast_hyper(name, "weights", weights, num_teachers)
  mask = _checks.check_where(name, where, s.shape[:-1])
  s, = _mask_inputs(mask, s)
  t = _checks.upcast(t)
  if mask is not None:
    t = jnp.where(mask[None, ..., None], t, 0)
  student_log_probs = {}  # reuse log_softmax(s / T) across equal temperatures
  total = jnp.zeros(s.shape[:-1], s.dtype)
  for n in range(num_teachers):
    temperature, weight = temperatures[n], weights[n]
    key = temperature if _checks.is_python_number(temperature) else ("n", n)
    if key not in student_log_probs:
      student_log_probs[key] = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t[n] / temperature, axis=-1)
    total = total + weight * temperature**2 * _kl_from_log(
        log_pt, student_log_probs[key])
  return _mask_output(mask, total)

