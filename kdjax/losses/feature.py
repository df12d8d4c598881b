"""Per-example feature losses: hints (FitNets) and attention transfer.

Features are `[B, ...]` arrays: NHWC maps for conv nets, `[B, D]` embeddings, `[B, T, D]`
sequences. Every loss returns one value per example, shape `[B]`, with an optional `where`
`[B]` mask (masked rows are exactly 0 and get no gradient, whatever they hold). The student's
features must already have the teacher's shape where the loss needs it: the connector that
maps them (a 1x1 conv, a linear layer) belongs to the method, not to the loss.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

Numeric = Union[float, jax.Array]

__all__ = ["attention_transfer", "fitnet"]


def _rows(name, student, teacher, where, *, min_rank):
  s = _checks.check_features(name, "student_features", student, min_rank=min_rank)
  t = _checks.check_features(name, "teacher_features", teacher, min_rank=min_rank)
  if s.shape[0] != t.shape[0]:
    raise ValueError(f"{name}: student_features shape {tuple(s.shape)} and teacher_features "
                     f"shape {tuple(t.shape)} have different batch sizes")
  mask = _checks.check_where(name, where, s.shape[:1])
  return _checks.upcast(s), _checks.upcast(t), mask


def _masked(values, mask):
  return values if mask is None else jnp.where(mask, values, 0.0)


def _zero_masked_rows(x, mask):
  if mask is None:
    return x
  return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def fitnet(student_features: ArrayLike, teacher_features: ArrayLike, *,
           where: Optional[ArrayLike] = None) -> jax.Array:
  r"""FitNets hint loss: the mean squared error between (connected) student and teacher
  features, per example.

  .. math:: \ell_i = \tfrac{1}{D} \sum_d (s_{i,d} - t_{i,d})^2

  over the `D` elements of example `i`'s feature. Averaged over the batch this is PyTorch's
  `nn.MSELoss()`, RepDistiller's `HintLoss`.

  Args:
    student_features: `[B, ...]` student features, already mapped to the teacher's shape
      by a connector (FitNets' regressor).
    teacher_features: `[B, ...]` teacher features, same shape.
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.zeros((2, 2, 2, 1))
    >>> t = jnp.stack([jnp.full((2, 2, 1), 1.0), jnp.full((2, 2, 1), 2.0)])
    >>> losses.fitnet(s, t)
    Array([1., 4.], dtype=float32)

  Reference:
    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
  """
  name = "fitnet"
  s, t, mask = _rows(name, student_features, teacher_features, where, min_rank=2)
  if s.shape != t.shape:
    raise ValueError(
        f"{name}: student_features shape {tuple(s.shape)} and teacher_features shape "
        f"{tuple(t.shape)} differ; map the student's features to the teacher's shape with a "
        "connector first (a 1x1 conv for maps, a linear layer for embeddings: the method's "
        "`connector`)")
  s, t = _zero_masked_rows(s, mask), _zero_masked_rows(t, mask)
  per_example = jnp.mean(jnp.square(s - t).reshape(s.shape[0], -1), axis=-1)
  return _masked(per_example, mask)


def _attention_map(features: jax.Array, p: Numeric) -> jax.Array:
  """`l2_normalize(flatten(mean_c f**p))` per example: `[B, H, W, C]` -> `[B, H*W]`."""
  energy = jnp.mean(features ** p, axis=-1).reshape(features.shape[0], -1)
  return _checks.l2_normalize(energy, axis=-1)


def attention_transfer(student_features: ArrayLike, teacher_features: ArrayLike, *,
                       p: Numeric = 2, where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Attention transfer: match the spatial attention maps of student and teacher.

  .. math::
    a(f) = \frac{\mathrm{vec}(\tfrac1C \sum_c f_c^p)}{\lVert \mathrm{vec}(\tfrac1C \sum_c f_c^p)
    \rVert_2}, \qquad \ell_i = \tfrac{1}{HW} \sum_{hw} (a(s_i) - a(t_i))_{hw}^2

  As in the official code (and RepDistiller) there is no `abs`: for odd `p` this differs
  from the paper's `|f|^p`. Channels may differ between student and teacher; the spatial
  sizes may not. RepDistiller weights this loss by 1000 (`beta`) in its CIFAR recipes.

  Args:
    student_features: `[B, H, W, C_s]` (NHWC) or `[B, T, C_s]` student features.
    teacher_features: `[B, H, W, C_t]` teacher features with the same `H, W`.
    p: the power of the attention map (2 in the paper).
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> f = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> losses.attention_transfer(f, 3.0 * f)   # maps are scale-invariant
    Array([0.], dtype=float32)

  Reference:
    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
  """
  name = "attention_transfer"
  _checks.check_positive(name, "p", p)
  s, t, mask = _rows(name, student_features, teacher_features, where, min_rank=3)
  if s.shape[:-1] != t.shape[:-1]:
    raise ValueError(
        f"{name}: student_features shape {tuple(s.shape)} and teacher_features shape "
        f"{tuple(t.shape)} have different spatial sizes {tuple(s.shape[1:-1])} vs "
        f"{tuple(t.shape[1:-1])}; pick taps of equal resolution or pool the larger one "
        "(RepDistiller's AT uses adaptive average pooling) before the loss")
  s, t = _zero_masked_rows(s, mask), _zero_masked_rows(t, mask)
  per_example = jnp.mean(jnp.square(_attention_map(s, p) - _attention_map(t, p)), axis=-1)
  return _masked(per_example, mask)
