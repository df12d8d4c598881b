"""ReviewKD's hierarchical context loss (HCL).

ReviewKD (Chen et al., CVPR 2021) fuses the student's stages from the deepest to the
shallowest (the ABF modules, owned by `kdjax.methods.review_kd`) and compares each fused map
with the teacher's map of the same stage by HCL: the MSE at full resolution plus the MSE of
both maps average-pooled to 4x4, 2x2 and 1x1 (a spatial pyramid), so that context at several
scales is matched. Only `jax` is imported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["hcl"]

# Pyramid levels and the official weighting: each level that is used halves the weight.
_LEVELS = (4, 2, 1)


def _bins(size: int, out: int) -> List[tuple]:
  """PyTorch's adaptive pooling windows: `[floor(i*size/out), ceil((i+1)*size/out))`."""
  return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, out, out, C]`, PyTorch's `adaptive_avg_pool2d` (windows may overlap
  when `out` does not divide the size)."""
  _, h, w, _ = x.shape
  if h % out == 0 and w % out == 0:
    return jnp.mean(x.reshape(x.shape[0], out, h // out, out, w // out, x.shape[-1]),
                    axis=(2, 4))
  rows = []
  for h0, h1 in _bins(h, out):
    rows.append(jnp.stack([jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2))
                           for w0, w1 in _bins(w, out)], axis=1))
  return jnp.stack(rows, axis=1)


def _as_map(name: str, arg_name: str, x, index: int) -> jax.Array:
  label = arg_name if index < 0 else f"{arg_name}[{index}]"
  x = _checks.check_features(name, label, x)
  if x.ndim == 2:  # A pooled embedding [B, C] is a 1x1 map, as in the official code.
    return x[:, None, None, :]
  if x.ndim != 4:
    raise ValueError(f"{name}: {label} must be a [B, H, W, C] map (NHWC) or a [B, C] "
                     f"embedding (a 1x1 map), got shape {tuple(x.shape)}")
  return x


def _hcl_pair(s: jax.Array, t: jax.Array) -> jax.Array:
  per_example = lambda a, b: jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)
  height = s.shape[1]
  total, weight, weight_sum = per_example(s, t), 1.0, 1.0
  for level in _LEVELS:
    # The official loop skips a level that is not smaller than the map (`if l >= h`) and
    # halves the weight only for the levels it uses.
    if level >= height:
      continue
    weight /= 2.0
    total = total + weight * per_example(adaptive_avg_pool(s, level),
                                         adaptive_avg_pool(t, level))
    weight_sum += weight
  return total / weight_sum


def hcl(student_features: Union[ArrayLike, Sequence[ArrayLike]],
        teacher_features: Union[ArrayLike, Sequence[ArrayLike]], *,
        where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Hierarchical context loss (ReviewKD), per example.

  For one pair of `[B, H, W, C]` maps, with `P_l` adaptive average pooling to `l x l` and
  `mse_i` the mean squared error over example `i`'s elements,

  .. math::
    \ell_i = \frac{\mathrm{mse}_i(s, t) + \sum_{k} w_k\, \mathrm{mse}_i(P_{l_k} s, P_{l_k} t)}
    {1 + \sum_k w_k}

  over the levels `l_k` in `(4, 2, 1)` that are smaller than `H`, with weights `1/2, 1/4,
  1/8` for the first, second, third level used (an 8x8 map: levels 4, 2, 1 with weights 1/2,
  1/4, 1/8, so the divisor is 1.875; a 1x1 map: the plain MSE). This is `hcl` of the official
  code (dvlab-research/ReviewKD, `CIFAR-100/model/reviewkd.py`@6607308a; mdistiller's
  `hcl_loss`), whose `F.mse_loss(reduction='mean')` is the batch mean of this per-example
  value. Sequences of maps (the stages) are summed, as the official `hcl` sums over stages.

  Args:
    student_features: `[B, H, W, C]` (NHWC) fused student map, or `[B, C]` (a 1x1 map), or a
      sequence of such, one per stage.
    teacher_features: the teacher's maps, same shapes (same sequence length).
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.zeros((1, 2, 2, 1))
    >>> t = jnp.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 2, 2, 1)
    >>> # full size: mse 1; pooled to 1x1: mean 0, mse 0, weight 1/2 -> (1 + 0) / 1.5
    >>> losses.hcl(s, t)
    Array([0.6666667], dtype=float32)

  Reference:
    Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.
  """
  name = "hcl"
  several = isinstance(student_features, (list, tuple))
  if several != isinstance(teacher_features, (list, tuple)):
    raise TypeError(f"{name}: student_features and teacher_features must both be arrays or "
                    "both be sequences of arrays (one per stage)")
  students = list(student_features) if several else [student_features]
  teachers = list(teacher_features) if several else [teacher_features]
  if not students or len(students) != len(teachers):
    raise ValueError(f"{name}: got {len(students)} student and {len(teachers)} teacher maps; "
                     "pass the same number (at least one), paired in order")
  pairs = []
  for i, (s, t) in enumerate(zip(students, teachers)):
    index = i if several else -1
    s = _as_map(name, "student_features", s, index)
    t = _as_map(name, "teacher_features", t, index)
    if s.shape != t.shape:
      label = f"[{i}]" if several else ""
      raise ValueError(
          f"{name}: student_features{label} shape {tuple(s.shape)} and "
          f"teacher_features{label} shape {tuple(t.shape)} differ; ReviewKD's ABF modules "
          "map each fused student stage to its teacher stage's shape before the loss")
    pairs.append((s, t))
  batch = pairs[0][0].shape[0]
  for s, _ in pairs:
    if s.shape[0] != batch:
      raise ValueError(f"{name}: every map must have the batch size {batch}, got shape "
                       f"{tuple(s.shape)}")
  mask = _checks.check_where(name, where, (batch,))
  total = 0.0
  for s, t in pairs:
    s, t = _checks.upcast(s), _checks.upcast(t)
    if mask is not None:
      rows = mask.reshape(-1, 1, 1, 1)
      s, t = jnp.where(rows, s, 0), jnp.where(rows, t, 0)
    total = total + _hcl_pair(s, t)
  return total if mask is None else jnp.where(mask, total, 0.0)
