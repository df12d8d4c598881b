"""CAT-KD: class attention transfer, the MSE between pooled class activation maps (Guo et
al. 2023).

Class activation maps (CAMs) are `[B, H, W, K]` arrays, one spatial map per class: the last
convolutional feature map passed through the classifier's weights as a 1x1 convolution. The
method (`kdjax.methods.cat_kd`) builds them; this file holds the pure objective.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["cat_kd"]


def _adaptive_pool_matrix(size: int, output: int) -> np.ndarray:
  """`[output, size]` averaging weights of PyTorch's `adaptive_avg_pool` along one axis:
  bin `o` covers `[floor(o * size / output), ceil((o + 1) * size / output))`."""
  matrix = np.zeros((output, size), np.float64)
  for o in range(output):
    start, end = (o * size) // output, -((-(o + 1) * size) // output)
    matrix[o, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_average_pool(maps: jax.Array, size: Union[int, Tuple[int, int]]) -> jax.Array:
  """`[B, H, W, K]` -> `[B, h, w, K]` as PyTorch's `F.adaptive_avg_pool2d(x, (h, w))`
  (`size` an int for `h = w`; bins may overlap when `h` does not divide `H`)."""
  height, width = (size, size) if isinstance(size, int) else size
  rows = jnp.asarray(_adaptive_pool_matrix(maps.shape[1], height), maps.dtype)
  columns = jnp.asarray(_adaptive_pool_matrix(maps.shape[2], width), maps.dtype)
  return jnp.einsum("oh,bhwk,pw->bopk", rows, maps, columns)


def cat_kd(student_cams: ArrayLike, teacher_cams: ArrayLike, *, resolution: int = 2,
           normalize: bool = False, where: Optional[ArrayLike] = None) -> jax.Array:
  r"""Class attention transfer: match the average-pooled class activation maps.

  Both `[B, H, W, K]` CAMs are average-pooled to `r x r` (`adaptive_avg_pool2d`); with
  `normalize`, each class's pooled map is l2-normalised over its `r*r` positions
  (`F.normalize(dim=(2, 3))`). Per example, the mean squared difference over `r*r*K` values:

  .. math:: \ell_i = \tfrac{1}{r^2 K} \sum_{h,w,k} \big(P(s_i)_{hwk} - P(t_i)_{hwk}\big)^2

  Averaged over the batch this is the official `CAT_loss` (GzyAftermath/CAT-KD,
  `mdistiller/distillers/CAT_KD.py` @ `2657a68`). Its CIFAR-100 and ImageNet configs set
  `IF_NORMALIZE: False`, hence the default; `CAM_RESOLUTION` is 2 on CIFAR. The spatial sizes
  of student and teacher may differ (both are pooled); the class counts may not.

  Args:
    student_cams: `[B, H_s, W_s, K]` student class activation maps (NHWC).
    teacher_cams: `[B, H_t, W_t, K]` teacher class activation maps.
    resolution: the pooled size `r` (a Python int >= 1, at most the smaller map's size).
    normalize: l2-normalise each pooled class map first.
    where: optional `[B]` mask.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.zeros((1, 4, 4, 1))
    >>> t = jnp.ones((1, 2, 2, 1)).at[0, 0, 0, 0].set(5.0)   # pooled to 1x1: mean 2
    >>> losses.cat_kd(s, t, resolution=1)
    Array([4.], dtype=float32)

  Reference:
    Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023.
  """
  name = "cat_kd"
  s = _checks.check_features(name, "student_cams", student_cams, min_rank=4)
  t = _checks.check_features(name, "teacher_cams", teacher_cams, min_rank=4)
  if s.ndim != 4 or t.ndim != 4 or s.shape[0] != t.shape[0] or s.shape[-1] != t.shape[-1]:
    raise ValueError(
        f"{name}: student_cams shape {tuple(s.shape)} and teacher_cams shape "
        f"{tuple(t.shape)} must both be [B, H, W, K] with the same B and number of classes K "
        "(spatial sizes may differ)")
  smallest = min(s.shape[1], s.shape[2], t.shape[1], t.shape[2])
  if (not isinstance(resolution, int) or isinstance(resolution, bool)
      or not 1 <= resolution <= smallest):
    raise ValueError(f"{name}: resolution must be a Python int in [1, {smallest}] (the "
                     f"smaller map's size; shapes {tuple(s.shape)} and {tuple(t.shape)}), "
                     f"got {resolution!r}")
  mask = _checks.check_where(name, where, s.shape[:1])
  s, t = _checks.upcast(s), _checks.upcast(t)
  if mask is not None:  # Padding rows may hold NaN/inf: replaced before any arithmetic.
    expand = mask[:, None, None, None]
    s, t = jnp.where(expand, s, 0), jnp.where(expand, t, 0)
  pooled_s, pooled_t = adaptive_average_pool(s, resolution), adaptive_average_pool(t, resolution)
  if normalize:
    unit = lambda x: _checks.l2_normalize(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)
    pooled_s, pooled_t = unit(pooled_s), unit(pooled_t)
  per_example = jnp.mean(jnp.square(pooled_s - pooled_t).reshape(s.shape[0], -1), axis=-1)
  return per_example if mask is None else jnp.where(mask, per_example, 0.0)
