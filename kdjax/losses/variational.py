"""Variational information distillation (VID): the teacher feature's Gaussian negative
log-likelihood under the student's prediction.

The method (`kdjax.methods.vid`) owns the regressor that predicts the mean from the student's
feature and the per-channel variance parameters; this file holds the pure objective.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["vid"]


def vid(student_mean: ArrayLike, teacher_features: ArrayLike, alpha: ArrayLike, *,
        eps: float = 1e-5, where: Optional[ArrayLike] = None) -> jax.Array:
  r"""VID: negative log-likelihood of the teacher feature under a Gaussian from the student.

  The variational distribution `q(t | s)` is a Gaussian with mean `mu(s)` (`student_mean`,
  the regressor's output) and a variance per channel `c`, shared over positions and examples,
  `sigma_c^2 = softplus(alpha_c) + eps` (the paper's parametrisation: the variance does not
  depend on the input). Per example,

  .. math::
    \ell_i = \tfrac{1}{N C} \sum_{n, c} \tfrac12 \Big(\frac{(t_{i,n,c} - \mu_{i,n,c})^2}
             {\sigma_c^2} + \log \sigma_c^2\Big)

  over the `N` positions and `C` channels, without the constant `log(2 pi) / 2`. Averaged
  over the batch this is RepDistiller's `VIDLoss` (HobbitLong/RepDistiller
  `distiller_zoo/VID.py` @ `1e2f816`: variance `log(1 + exp(log_scale)) + eps`, `eps` 1e-5,
  `torch.mean` of the per-element values). Minimising it over `alpha` makes `sigma_c^2` the
  mean squared error of channel `c`.

  Args:
    student_mean: `[B, ..., C]` predicted mean (NHWC maps or `[B, D]` embeddings).
    teacher_features: teacher features, same shape.
    alpha: `[C]` variance parameters (RepDistiller's `log_scale`), one per channel.
    eps: the variance floor (>= 0).
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> # softplus(alpha) = 1 (alpha = log(e - 1)), eps 0: 0.5 * (error^2 + log 1).
    >>> alpha = jnp.log(jnp.expm1(jnp.array([1.0])))
    >>> losses.vid(jnp.zeros((2, 1)), jnp.array([[1.0], [2.0]]), alpha, eps=0.0)
    Array([0.5, 2. ], dtype=float32)

  Reference:
    Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.
  """
  name = "vid"
  s = _checks.check_features(name, "student_mean", student_mean, min_rank=2)
  t = _checks.check_features(name, "teacher_features", teacher_features, min_rank=2)
  a = _checks.check_features(name, "alpha", alpha, min_rank=1)
  if s.shape != t.shape:
    raise ValueError(
        f"{name}: student_mean shape {tuple(s.shape)} and teacher_features shape "
        f"{tuple(t.shape)} differ; the regressor must map the student's feature to the "
        "teacher's shape (the method's 1x1-conv `regressor`; pool the larger map first)")
  if a.shape != (t.shape[-1],):
    raise ValueError(f"{name}: alpha must have shape ({t.shape[-1]},) (one per channel of "
                     f"teacher_features shape {tuple(t.shape)}), got shape {tuple(a.shape)}")
  _checks.check_interval(name, "eps", eps, 0.0, float("inf"))
  mask = _checks.check_where(name, where, s.shape[:1])
  s, t, a = _checks.upcast(s), _checks.upcast(t), _checks.upcast(a)
  if mask is not None:  # Padding rows may hold NaN/inf: replaced before any arithmetic.
    expand = mask.reshape((-1,) + (1,) * (s.ndim - 1))
    s, t = jnp.where(expand, s, 0), jnp.where(expand, t, 0)
  variance = jax.nn.softplus(a) + eps
  negative_log_likelihood = 0.5 * (jnp.square(t - s) / variance + jnp.log(variance))
  per_example = jnp.mean(negative_log_likelihood.reshape(s.shape[0], -1), axis=-1)
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
