"""ND: regularising the student embedding's norm and direction toward the teacher's class
centres (Wang et al. 2023).

The class centres (the teacher's mean embedding per class) are an argument: the method
(`kdjax.methods.nd`) keeps them; this file holds the pure objective.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["nd"]


def nd(student_embedding: ArrayLike, teacher_embedding: ArrayLike, class_means: ArrayLike,
       labels: ArrayLike, *, eps: float = 1e-12,
       where: Optional[ArrayLike] = None) -> jax.Array:
  r"""ND loss: push the student embedding along its class centre's direction, with a norm
  at least the teacher's.

  With `e_y = c_y / ||c_y||` the unit direction of the teacher's class centre for the label
  `y_i`,

  .. math::
    \ell_i = 1 - \frac{s_i^\top e_{y_i}}{\max(\lVert s_i \rVert, \lVert t_i \rVert)}
           = 1 - \underbrace{\frac{\lVert s_i \rVert}{\max(\lVert s_i \rVert,
             \lVert t_i \rVert)}}_{\text{norm}} \,
             \underbrace{\cos(s_i, c_{y_i})}_{\text{direction}}

  The direction factor aligns the student with the class centre; the norm factor is 1 only
  once the student's norm reaches the teacher's (larger norms are not penalised: the paper's
  finding is that larger-norm features classify better). This is the official
  `DirectNormLoss.project_center` (WangYZ1608/Knowledge-Distillation-via-ND,
  `CIFAR/utils.py` @ `3b2ff1b`), whose batch mean is the ND term.

  Args:
    student_embedding: `[B, D]` student embeddings, already mapped to the teacher's `D`.
    teacher_embedding: `[B, D]` teacher embeddings.
    class_means: `[K, D]` the teacher's class-centre embeddings (any scale: only their
      direction is used).
    labels: `[B]` int class labels in `[0, K)`.
    eps: floor of the denominator (an all-zero student and teacher row gives 1, not NaN).
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> means = jnp.array([[2.0, 0.0], [0.0, 3.0]])
    >>> s = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    >>> t = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> losses.nd(s, t, means, jnp.array([0, 1]))   # 1 - 1/2; 1 - 1/sqrt(2)
    Array([0.5       , 0.29289323], dtype=float32)

  Reference:
    Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and
    Direction", arXiv:2305.17007, 2023.
  """
  name = "nd"
  s = _checks.check_features(name, "student_embedding", student_embedding, min_rank=2)
  t = _checks.check_features(name, "teacher_embedding", teacher_embedding, min_rank=2)
  means = _checks.check_features(name, "class_means", class_means, min_rank=2)
  if s.ndim != 2 or s.shape != t.shape or means.ndim != 2 or means.shape[1] != s.shape[1]:
    raise ValueError(
        f"{name}: student_embedding shape {tuple(s.shape)} and teacher_embedding shape "
        f"{tuple(t.shape)} must both be [B, D] with the class_means' D (class_means shape "
        f"{tuple(means.shape)}); map the student's embedding to the teacher's width with a "
        "connector first (the method's `connector`)")
  _checks.check_positive(name, "eps", eps)
  mask = _checks.check_where(name, where, s.shape[:1])
  labels = _checks.check_labels(name, labels, s.shape[:1], means.shape[0], mask)
  s, t, means = _checks.upcast(s), _checks.upcast(t), _checks.upcast(means)
  if mask is not None:  # Padding rows may hold NaN/inf or "ignore" labels.
    s, t = jnp.where(mask[:, None], s, 0), jnp.where(mask[:, None], t, 0)
    labels = jnp.where(mask, labels, 0)
  direction = _checks.l2_normalize(means, axis=-1)[labels]
  largest_norm = jnp.maximum(_checks.safe_norm(s, axis=-1), _checks.safe_norm(t, axis=-1))
  per_example = 1.0 - jnp.sum(s * direction, axis=-1) / jnp.maximum(largest_norm, eps)
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
