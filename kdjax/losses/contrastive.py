"""Contrastive representation distillation (CRD): the NCE objective on memory-bank scores.

The method (`kdjax.methods.crd`) owns the embedding heads, the memory banks and the sampling
of negatives; this file holds the pure objective they feed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["crd_nce"]


def crd_nce(positive: ArrayLike, negatives: ArrayLike, *, num_data: int, eps: float = 1e-7,
            where: Optional[ArrayLike] = None) -> jax.Array:
  r"""CRD's noise-contrastive estimation loss, per example.

  `positive` `[B]` and `negatives` `[B, K]` are the unnormalised densities
  `exp(<v, m> / T) / Z` of the positive pair and of `K` negatives drawn uniformly from
  `num_data` examples (noise density `P_n = 1 / num_data`, `m = K`):

  .. math::
    \ell_i = -\log\frac{p_i}{p_i + m P_n + \epsilon}
             - \sum_{k=1}^{K} \log\frac{m P_n}{n_{ik} + m P_n + \epsilon}

  Averaged over the batch this is the official `ContrastLoss` (RepDistiller `crd/criterion.py`:
  `-(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz`).

  Args:
    positive: `[B]` densities of the positive pairs (> 0).
    negatives: `[B, K]` densities of the negatives (> 0).
    num_data: the number of examples the negatives are drawn from (the memory bank size).
    eps: added inside both logs, as the official code.
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> # One negative of 4 examples (m P_n = 1/4); densities 1/4 each: both ratios are 1/2.
    >>> loss = losses.crd_nce(jnp.array([0.25]), jnp.array([[0.25]]), num_data=4, eps=0.0)
    >>> round(float(loss[0]), 6) == round(2 * float(jnp.log(2.0)), 6)
    True

  Reference:
    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.
  """
  name = "crd_nce"
  positive = _checks.upcast(_checks.check_features(name, "positive", positive, min_rank=1))
  negatives = _checks.upcast(_checks.check_features(name, "negatives", negatives, min_rank=2))
  if positive.ndim != 1 or negatives.shape[0] != positive.shape[0]:
    raise ValueError(f"{name}: positive must be [B] and negatives [B, K]; got shapes "
                     f"{tuple(positive.shape)} and {tuple(negatives.shape)}")
  if not isinstance(num_data, int) or num_data <= negatives.shape[1]:
    raise ValueError(f"{name}: num_data must be an integer larger than the number of "
                     f"negatives K={negatives.shape[1]}, got {num_data!r}")
  mask = _checks.check_where(name, where, positive.shape)
  if mask is not None:  # Padding rows may hold anything: replaced before the logs.
    positive = jnp.where(mask, positive, 1.0)
    negatives = jnp.where(mask[:, None], negatives, 1.0)
  noise = negatives.shape[1] / num_data  # m * P_n
  log_positive = jnp.log(positive / (positive + noise + eps))
  log_negatives = jnp.log(noise / (negatives + noise + eps))
  per_example = -(log_positive + jnp.sum(log_negatives, axis=1))
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
