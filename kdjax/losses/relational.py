"""Batch-relational logit losses.

These compare relations *between* examples of a batch, so they return a scalar
and take a `where` over the batch rows; with `where` the value equals the loss
computed on the selected rows alone (padding in a last batch changes nothing).
Under data parallelism the caller must hand them the global batch.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

Numeric = Union[float, jax.Array]

__all__ = ["dist"]


def _safe_norm(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
  """sqrt(sum w x^2) with a finite (zero) gradient when the sum is 0."""
  squared = jnp.sum(weights * x * x, axis=axis)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _pearson(a: jax.Array, b: jax.Array, weights: jax.Array, axis: int,
             count: jax.Array, eps: float) -> jax.Array:
  """Weighted Pearson correlation along `axis` (weights are 0/1).

  Matches DIST's `cosine_similarity(a - mean(a), b - mean(b))` with the `eps`
  added to the product of the norms.
  """
  mean_a = jnp.sum(weights * a, axis=axis, keepdims=True) / count
  mean_b = jnp.sum(weights * b, axis=axis, keepdims=True) / count
  centered_a = a - mean_a
  centered_b = b - mean_b
  covariance = jnp.sum(weights * centered_a * centered_b, axis=axis)
  norms = (_safe_norm(centered_a, weights, axis)
           * _safe_norm(centered_b, weights, axis))
  return covariance / (norms + eps)


def dist(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
         beta: Numeric = 1.0, gamma: Numeric = 1.0,
         temperature: Numeric = 1.0, eps: float = 1e-8,
         where: Optional[ArrayLike] = None) -> jax.Array:
  r"""DIST: match inter-class and intra-class correlations of predictions.

  With `P_s = softmax(z_s / T)`, `P_t = softmax(z_t / T)` of shape `[B, C]`,

  .. math::
    \ell = T^2 \Big(\beta \big(1 - \tfrac1B \sum_i \rho(P_s[i], P_t[i])\big)
         + \gamma \big(1 - \tfrac1C \sum_c \rho(P_s[:, c], P_t[:, c])\big)\Big)

  where `rho` is the Pearson correlation (as in the official code: covariance
  over `(norm * norm + eps)`). The row term (`beta`, "inter-class relation")
  compares each example's class ranking; the column term (`gamma`,
  "intra-class relation") compares how each class is spread over the batch.

  Args:
    student_logits: `[B, C]` student logits; `[B, T, V]` (any `[..., C]`) is
      flattened into rows `[B*T, V]`.
    teacher_logits: teacher logits, same shape.
    beta: weight of the inter-class (per-row) term.
    gamma: weight of the intra-class (per-column) term.
    temperature: softmax temperature `T > 0`.
    eps: added to the product of norms in each correlation.
    where: optional mask of shape `logits.shape[:-1]` selecting the rows; the
      result equals `dist` on the selected rows alone (0 if none is selected).

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    >>> print(round(float(losses.dist(s, s)), 4))   # identical: 0
    0.0
    >>> # Swapped rows: each row correlates -1/2 with its cyclic shift and every
    >>> # two-point column correlates -1, so 1.5 + 2.
    >>> print(round(float(losses.dist(s, s[::-1])), 4))
    3.5

  Reference:
    Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST),
    NeurIPS 2022.
  """
  name = "dist"
  s = _checks.check_logits(name, "student_logits", student_logits)
  t = _checks.check_logits(name, "teacher_logits", teacher_logits)
  _checks.check_same_shape(name, s, t)
  _checks.check_positive(name, "temperature", temperature)
  mask = _checks.check_where(name, where, s.shape[:-1])
  num_classes = s.shape[-1]
  s = _checks.upcast(s).reshape(-1, num_classes)
  t = _checks.upcast(t).reshape(-1, num_classes)
  if mask is None:
    mask = jnp.ones(s.shape[:1], bool)
  else:
    mask = mask.reshape(-1)
  # Replace unselected rows before any arithmetic so inf/NaN there cannot leak.
  s = jnp.where(mask[:, None], s, 0)
  t = jnp.where(mask[:, None], t, 0)
  weights = mask.astype(s.dtype)
  num_rows = jnp.sum(weights)
  safe_rows = jnp.maximum(num_rows, 1.0)

  p_s = jax.nn.softmax(s / temperature, axis=-1)
  p_t = jax.nn.softmax(t / temperature, axis=-1)
  ones = jnp.ones_like(p_s)
  row_corr = _pearson(p_s, p_t, ones, axis=1, count=float(num_classes), eps=eps)
  inter = 1.0 - jnp.sum(weights * row_corr) / safe_rows
  column_corr = _pearson(p_s, p_t, weights[:, None], axis=0, count=safe_rows,
                         eps=eps)
  intra = 1.0 - jnp.mean(column_corr)
  loss = temperature**2 * (beta * inter + gamma * intra)
  return jnp.where(num_rows > 0, loss, 0.0)
