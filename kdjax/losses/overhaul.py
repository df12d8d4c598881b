"""Overhaul of feature distillation (OFD): the teacher's margin and the partial L2 loss.

OFD (Heo et al., ICCV 2019) distils pre-ReLU features. The teacher's negative responses are
clipped at a per-channel margin `m`, the expected value of the teacher's pre-ReLU response
given that it is negative, computed in closed form from the BatchNorm that precedes the ReLU
(`ofd_margin`). The student (after a connector that maps its channels to the teacher's) is then
penalised only where it would change the teacher's post-ReLU signal (`ofd`).

Only `jax` is imported; the connector (1x1 conv + BatchNorm) belongs to the method
(`kdjax.methods.ofd`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["ofd", "ofd_margin"]

# The official code falls back to -3 * std when P(x < 0) <= this (the conditional mean is then
# dominated by the far tail and numerically meaningless).
_MIN_NEGATIVE_PROBABILITY = 0.001
_TAIL_Z = 10.0


def ofd_margin(bn_scale: ArrayLike, bn_bias: ArrayLike) -> jax.Array:
  r"""OFD's margin: per channel, `E[x | x < 0]` for `x ~ N(bias, scale**2)`.

  The teacher's pre-ReLU response after a BatchNorm with scale `gamma` and bias `beta` is
  modelled as `N(beta, gamma**2)`. With `s = |gamma|`, `z = -beta / s` and `Phi` the standard
  normal CDF,

  .. math::
    m = \beta - \frac{s\, e^{-z^2/2}}{\sqrt{2\pi}\,\Phi(z)} \quad\text{if } \Phi(z) > 0.001,
    \qquad m = -3 s \quad\text{otherwise,}

  exactly the official `get_margin_from_BN` (clovaai/overhaul-distillation,
  `CIFAR-100/distiller.py`@76344a84). `Phi` is `jax.scipy.special.ndtr` (stable in both
  tails); where `Phi(z) > 0.001` we have `z > -3.1`, so the ratio is well conditioned, and for
  `z > 10` the correction term (below `1e-22 * s`, while `|beta| > 10 s`) is dropped, which
  keeps the gradient finite for tiny scales. A zero scale (a point mass at `beta`; the
  official code divides by zero there) gives the limit `min(beta, 0)`. Every margin is
  `<= 0`; values and gradients are finite for any finite input (tested for scales from 1e-30
  to 1e30). The margin is a constant of the teacher (OFD's method reads it under
  stop_gradient).

  Args:
    bn_scale: `[C]` the BatchNorm's scale (`gamma`; PyTorch's `bn.weight`).
    bn_bias: `[C]` the BatchNorm's bias (`beta`).

  Returns:
    `[C]` margins (float32, or float64 for float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> losses.ofd_margin(jnp.array([1.0, 2.0]), jnp.array([0.0, -100.0]))  # -sqrt(2/pi)
    Array([  -0.7978846, -100.       ], dtype=float32)

  Reference:
    Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.
  """
  name = "ofd_margin"
  scale = _checks.as_array(name, "bn_scale", bn_scale)
  bias = _checks.as_array(name, "bn_bias", bn_bias)
  for arg_name, x in (("bn_scale", scale), ("bn_bias", bias)):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim != 1:
      raise ValueError(f"{name}: {arg_name} must be a floating [C] vector (one value per "
                       f"channel), got dtype {x.dtype} with shape {tuple(x.shape)}")
  if scale.shape != bias.shape:
    raise ValueError(f"{name}: bn_scale shape {tuple(scale.shape)} and bn_bias shape "
                     f"{tuple(bias.shape)} must be equal (one value per channel)")
  scale, bias = _checks.upcast(scale), _checks.upcast(bias)
  s = jnp.abs(scale)
  positive = s > 0
  # Which branch each channel takes is decided without gradient; every branch is then
  # evaluated on values that are safe for it, so no 0 * inf reaches a gradient.
  z = jax.lax.stop_gradient(jnp.where(positive, -bias / jnp.where(positive, s, 1.0), 0.0))
  use_formula = positive & (ndtr(z) > _MIN_NEGATIVE_PROBABILITY)
  # For z > 10 the correction s * exp(-z**2 / 2) / (sqrt(2 pi) Phi(z)) is below 1e-22 * s
  # while |bias| = z * s: the margin is the bias to float precision.
  in_tail = use_formula & (z > _TAIL_Z)
  formula = use_formula & ~in_tail
  formula_s = jnp.where(formula, s, 1.0)
  formula_bias = jnp.where(formula, bias, 0.0)
  formula_z = -formula_bias / formula_s
  conditional_mean = formula_bias - formula_s * jnp.exp(-0.5 * formula_z ** 2) / (
      math.sqrt(2.0 * math.pi) * ndtr(formula_z))
  fallback = jnp.where(positive, -3.0 * s, jnp.minimum(bias, 0.0))
  return jnp.where(formula, conditional_mean, jnp.where(in_tail, bias, fallback))


def ofd(student_preact_mapped: ArrayLike, teacher_preact: ArrayLike, margin: ArrayLike, *,
        where: Optional[ArrayLike] = None) -> jax.Array:
  r"""OFD's partial L2 distance between connected student and teacher pre-ReLU features.

  With the teacher clipped at the margin, `t' = max(t, m)` (per channel, the last axis),

  .. math::
    \ell_i = \sum_{h,w,c} \mathbb{1}[s > t' \,\lor\, t' > 0]\,(s - t')^2

  summed (not averaged) over every position and channel of example `i`: where the teacher
  is negative (after clipping) a student response below it costs nothing, since both vanish
  after the ReLU. This is `distillation_loss` of the official code
  (clovaai/overhaul-distillation, `CIFAR-100/distiller.py`@76344a84) split by example.

  Scale of the official CIFAR-100 recipe: it sums this over the batch and over the three
  stages with weights `1/4, 1/2, 1` (shallow to deep), then divides by the batch size and by
  1000 (`train_with_distillation.py`: `loss_distill.sum() / batch_size / 1000`). The batch
  mean of this per-example value times `1e-3` is therefore the official term for one stage;
  mdistiller's `feat_loss` (`.mean(dim=0).sum()`, `FEAT_WEIGHT` 0.001) is the same.

  Args:
    student_preact_mapped: `[B, ..., C]` student pre-ReLU features after the connector
      (NHWC maps: `[B, H, W, C]`), in the teacher's shape.
    teacher_preact: `[B, ..., C]` teacher pre-ReLU features, same shape.
    margin: `[C]` per-channel margins (`ofd_margin` of the BatchNorm before the teacher's
      ReLU), broadcast over the last axis.
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> t = jnp.array([[2.0, -5.0, -5.0]])   # [B=1, C=3]
    >>> s = jnp.array([[1.0, -2.0, -9.0]])
    >>> # (1-2)^2 + (-2-(-3))^2; the third channel is below the clipped teacher: free.
    >>> losses.ofd(s, t, jnp.array([-1.0, -3.0, -3.0]))
    Array([2.], dtype=float32)

  Reference:
    Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.
  """
  name = "ofd"
  s = _checks.check_features(name, "student_preact_mapped", student_preact_mapped)
  t = _checks.check_features(name, "teacher_preact", teacher_preact)
  if s.shape != t.shape:
    raise ValueError(
        f"{name}: student_preact_mapped shape {tuple(s.shape)} and teacher_preact shape "
        f"{tuple(t.shape)} differ; map the student's features to the teacher's shape with "
        "the method's connector (a 1x1 conv + BatchNorm) first")
  m = _checks.as_array(name, "margin", margin)
  if m.ndim != 1 or m.shape[0] != t.shape[-1]:
    raise ValueError(
        f"{name}: margin must have shape ({t.shape[-1]},) (one value per teacher channel, "
        f"the last axis of teacher_preact shape {tuple(t.shape)}), got shape {tuple(m.shape)}")
  mask = _checks.check_where(name, where, s.shape[:1])
  s, t, m = _checks.upcast(s), _checks.upcast(t), _checks.upcast(m)
  if mask is not None:
    rows = mask.reshape((-1,) + (1,) * (s.ndim - 1))
    s, t = jnp.where(rows, s, 0), jnp.where(rows, t, 0)
  target = jnp.maximum(t, m)
  active = (s > target) | (target > 0)
  squared = jnp.where(active, jnp.square(s - target), 0.0)
  per_example = jnp.sum(squared.reshape(s.shape[0], -1), axis=-1)
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
