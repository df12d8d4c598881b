"""Kernel-based feature losses: correlation congruence (CC) and neuron selectivity transfer
(NST).

CC compares the batch's example-to-example kernel matrices, so it is batch-relational: it
returns a scalar and its `where` selects rows (the value equals the loss on the selected rows
alone). NST compares, within each example, the distributions of its channels' spatial
activation patterns, so it returns one value per example, `[B]`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks
from kdjax.losses.relational import _feature_rows

Numeric = Union[float, jax.Array]

__all__ = ["correlation_congruence", "nst"]


def _taylor_rbf(rows: jax.Array, gamma: Numeric, order: int) -> jax.Array:
  """`exp(-2 gamma) sum_{p<=order} (2 gamma)^p / p! (x_i . x_j)^p` on l2-normalised rows."""
  unit = _checks.l2_normalize(rows, axis=-1)
  similarity = unit @ unit.T
  total = jnp.zeros_like(similarity)
  power = jnp.ones_like(similarity)
  for p in range(order + 1):
    total = total + (2.0 * gamma) ** p / math.factorial(p) * power
    power = power * similarity
  return jnp.exp(-2.0 * gamma) * total


def correlation_congruence(student_features: ArrayLike, teacher_features: ArrayLike, *,
                           gamma: Numeric = 0.4, order: int = 2,
                           where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Correlation congruence: match the batch's Gaussian-RBF correlation matrices.

  Each example's features are flattened and l2-normalised, `x_i / ||x_i||`. The correlation
  of two examples is the Gaussian RBF kernel `exp(-gamma ||x_i - x_j||^2)`; on unit vectors
  it equals `exp(-2 gamma) exp(2 gamma x_i . x_j)`, whose Taylor series up to `order` P is
  the paper's approximation:

  .. math::
    k(x_i, x_j) = e^{-2\gamma} \sum_{p=0}^{P} \frac{(2\gamma)^p}{p!} (x_i^\top x_j)^p,
    \qquad \ell = \tfrac{1}{B^2} \sum_{i,j} \big(k_s(i, j) - k_t(i, j)\big)^2

  (the squared Frobenius distance of the two `[B, B]` matrices over `B^2`, the paper's
  `L_CC`). Defaults `gamma=0.4`, `P=2` as in the paper's experiments; JDAI-CV/FaceX-Zoo
  `addition_module/face_lightning/KDF/loss/cc.py` computes the same kernel and MSE.
  RepDistiller's `Correlation`
  (HobbitLong/RepDistiller `distiller_zoo/CC.py` @ `1e2f816`) computes something else:
  with `d_i = |s_i - t_i|`, the mean over neighbouring rows of `sum(d_i * d_{i+1})`, which
  depends on the batch order; this follows the paper, not RepDistiller.
  Student and teacher dims may differ.

  Args:
    student_features: `[B, ...]` student features (usually an embedding after a linear
      head), flattened per example.
    teacher_features: `[B, ...]` teacher features, same `B`.
    gamma: the RBF kernel's `gamma > 0`.
    order: the Taylor order `P >= 0` (a Python int).
    where: optional `[B]` mask; the result equals the loss on the selected rows alone.

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> e = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> float(losses.correlation_congruence(e, 3.0 * e))   # rows are normalised
    0.0
    >>> # Orthogonal vs identical rows: the two off-diagonal kernels are exp(-0.8) * 1 vs
    >>> # exp(-0.8) * (1 + 0.8 + 0.32); the diagonals agree.
    >>> import math
    >>> v = float(losses.correlation_congruence(e, jnp.ones((2, 2))))
    >>> math.isclose(v, 2 * (math.exp(-0.8) * (1.0 - 2.12)) ** 2 / 4, rel_tol=1e-6)
    True

  Reference:
    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
  """
  name = "correlation_congruence"
  _checks.check_positive(name, "gamma", gamma)
  if not isinstance(order, int) or isinstance(order, bool) or order < 0:
    raise ValueError(f"{name}: order must be a Python int >= 0 (the Taylor order P), got "
                     f"{order!r}")
  s, t, weights, count = _feature_rows(name, student_features, teacher_features, where)
  pairs = weights[:, None] * weights[None, :]
  difference = _taylor_rbf(s, gamma, order) - _taylor_rbf(t, gamma, order)
  return jnp.sum(jnp.square(difference) * pairs) / jnp.maximum(count * count, 1.0)


def _channel_patterns(features: jax.Array) -> jax.Array:
  """`[B, ..., C]` -> `[B, C, HW]`: each channel's spatial pattern, l2-normalised."""
  flat = features.reshape(features.shape[0], -1, features.shape[-1])
  return _checks.l2_normalize(jnp.swapaxes(flat, 1, 2), axis=-1)


def _mean_polynomial_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per example, the mean over channel pairs of `(a_i . b_j)^2` (d=2, c=0): `[B]`."""
  return jnp.mean(jnp.square(jnp.einsum("bil,bjl->bij", a, b)), axis=(1, 2))


def nst(student_features: ArrayLike, teacher_features: ArrayLike, *,
        where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Neuron selectivity transfer: squared MMD between the channels' activation patterns.

  Each channel of an example's map is one sample: its spatial pattern flattened to `HW`
  values and l2-normalised, `f_i`. With the polynomial kernel `k(x, y) = (x^\top y)^2`
  (`d=2, c=0`, the paper's best), the squared maximum mean discrepancy between the
  student's `C_s` and the teacher's `C_t` samples is

  .. math::
    \ell = \tfrac{1}{C_t^2}\sum_{i,j} k(t_i, t_j) + \tfrac{1}{C_s^2}\sum_{i,j} k(s_i, s_j)
           - \tfrac{2}{C_s C_t}\sum_{i,j} k(s_i, t_j)

  per example. Averaged over the batch this is RepDistiller's `NSTLoss` (HobbitLong/
  RepDistiller `distiller_zoo/NST.py` @ `1e2f816`, `full_loss=True`). Channel counts may
  differ; spatial sizes may not (RepDistiller pools the larger map first: do that before the
  loss).
  RepDistiller weights it by 50 on CIFAR-100.

  Args:
    student_features: `[B, H, W, C_s]` (NHWC) or `[B, L, C_s]` student features.
    teacher_features: `[B, H, W, C_t]` teacher features with the same spatial size.
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> f = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> losses.nst(f, 2.0 * f)   # patterns are normalised: identical distributions
    Array([0.], dtype=float32)
    >>> # One channel each, orthogonal patterns: 1 + 1 - 2 * 0.
    >>> losses.nst(jnp.array([[[1.0], [0.0]]]), jnp.array([[[0.0], [1.0]]]))
    Array([2.], dtype=float32)

  Reference:
    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017.
  """
  name = "nst"
  s = _checks.check_features(name, "student_features", student_features, min_rank=3)
  t = _checks.check_features(name, "teacher_features", teacher_features, min_rank=3)
  if s.shape[0] != t.shape[0] or s.shape[1:-1] != t.shape[1:-1]:
    raise ValueError(
        f"{name}: student_features shape {tuple(s.shape)} and teacher_features shape "
        f"{tuple(t.shape)} must have the same batch and spatial sizes (channels may differ); "
        "pick taps of equal resolution or pool the larger one (RepDistiller's NST uses "
        "adaptive average pooling) before the loss")
  mask = _checks.check_where(name, where, s.shape[:1])
  s, t = _checks.upcast(s), _checks.upcast(t)
  if mask is not None:  # Padding rows may hold NaN/inf: replaced before any arithmetic.
    expand = lambda x: mask.reshape((-1,) + (1,) * (x.ndim - 1))
    s, t = jnp.where(expand(s), s, 0), jnp.where(expand(t), t, 0)
  ps, pt = _channel_patterns(s), _channel_patterns(t)
  per_example = (_mean_polynomial_kernel(pt, pt) + _mean_polynomial_kernel(ps, ps)
                 - 2.0 * _mean_polynomial_kernel(ps, pt))
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
