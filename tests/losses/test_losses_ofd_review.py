"""OFD's margin and partial L2, ReviewKD's HCL: float64 numpy references written from the
official code (clovaai/overhaul-distillation `CIFAR-100/distiller.py`, dvlab-research/ReviewKD
`CIFAR-100/model/reviewkd.py`), hand-checked values, masks, gradients and extremes; the slow
tests compare with PyTorch/scipy re-implementations of the official functions."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses
from kdjax.losses import overhaul as ofd_module
from kdjax.losses import review as review_module
from kdjax.losses.overhaul import ofd as eager_ofd
from kdjax.losses.overhaul import ofd_margin as eager_ofd_margin
from kdjax.losses.review import hcl as eager_hcl

# Compiled once per shape: op-by-op (eager) dispatch of these small graphs is far slower.
ofd, ofd_margin, hcl = jax.jit(eager_ofd), jax.jit(eager_ofd_margin), jax.jit(eager_hcl)

# --- float64 numpy references, loop-based --------------------------------------------------


def ref_margin(scale, bias):
  """The official get_margin_from_BN, one channel at a time, with Phi from math.erfc."""
  out = []
  for g, m in zip(np.asarray(scale, np.float64), np.asarray(bias, np.float64)):
    s = abs(g)
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))  # Phi(-m / s)
    if cdf > 0.001:
      out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m)
    else:
      out.append(-3 * s)
  return np.array(out)


def ref_ofd(s, t, margin):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  out = np.zeros(len(s))
  for i in range(len(s)):
    for index in np.ndindex(s.shape[1:]):
      target = max(t[i][index], margin[index[-1]])
      if s[i][index] > target or target > 0:
        out[i] += (s[i][index] - target) ** 2
  return out


def ref_pool(x, out):
  """torch.nn.functional.adaptive_avg_pool2d on an NHWC map, window by window."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    for j in range(out):
      h0, h1 = (i * h) // out, math.ceil((i + 1) * h / out)
      w0, w1 = (j * w) // out, math.ceil((j + 1) * w / out)
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


def ref_hcl(s, t):
  """The official hcl for one pair, per example (F.mse_loss(reduction='mean') per row)."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  mse = lambda a, b: ((a - b) ** 2).reshape(len(a), -1).mean(1)
  h = s.shape[1]
  loss, cnt, tot = mse(s, t), 1.0, 1.0
  for level in (4, 2, 1):
    if level >= h:
      continue
    cnt /= 2.0
    loss = loss + mse(ref_pool(s, level), ref_pool(t, level)) * cnt
    tot += cnt
  return loss / tot


def _rng_maps(seed, shape, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32), (
      rng.normal(size=shape) * scale).astype(np.float32)


# --- ofd_margin -----------------------------------------------------------------------------


def test_margin_matches_reference_and_is_negative():
  rng = np.random.default_rng(0)
  scale = rng.uniform(0.05, 3.0, 64) * rng.choice([-1, 1], 64)
  bias = rng.normal(size=64) * 2
  bias[:4] = [3.05 * abs(scale[0]), 3.1 * abs(scale[1]), 2.9 * abs(scale[2]), 0.0]  # fallback edge
  expected = ref_margin(scale, bias)
  np.testing.assert_allclose(ofd_margin(scale.astype(np.float32), bias.astype(np.float32)),
                             expected, rtol=2e-5, atol=1e-6)
  assert np.all(expected <= 0)


def test_margin_hand_values_and_extremes_with_finite_gradients():
  # N(0,1): E[x|x<0] = -sqrt(2/pi); far below 0: the mean itself; P(x<0) = Phi(-5) < 0.001:
  # the -3*std fallback; |scale| is used; a zero scale: the limit min(bias, 0); then extremes.
  scale = jnp.array([1.0, 2.0, 1.0, -1.0, 0.0, 0.0,
                     1e-30, 1e30, 1e-30, 1e30, 1.0, 1.0, 1e-3])
  bias = jnp.array([0.0, -100.0, 5.0, 0.0, -2.0, 3.0,
                    1.0, 1.0, -1.0, -1e30, 1e30, -1e30, 1e3])
  margin = np.asarray(ofd_margin(scale, bias))
  root = math.sqrt(2 / math.pi)
  z1 = 1 + math.exp(-0.5) / math.sqrt(2 * math.pi) / 0.8413447  # N(-1, 1): -(1 + phi/Phi)
  np.testing.assert_allclose(
      margin, [-root, -100.0, -3.0, -root, -2.0, 0.0,
               -3e-30, -1e30 * root, -1.0, -1e30 * z1, -3.0, -1e30, -3e-3], rtol=1e-5)
  assert np.all(margin <= 0)
  total = lambda g, b: jnp.sum(ofd_margin(g, b))
  grads = jax.jit(jax.grad(total, argnums=(0, 1)))(scale, bias)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_margin_shape_errors():
  with pytest.raises(ValueError, match=r"ofd_margin: bn_scale shape \(3,\) and bn_bias shape "
                                       r"\(4,\)"):
    ofd_margin(jnp.ones(3), jnp.ones(4))
  with pytest.raises(ValueError, match=r"ofd_margin: bn_scale must be a floating \[C\] vector"):
    ofd_margin(jnp.ones((2, 3)), jnp.ones((2, 3)))


# --- ofd ------------------------------------------------------------------------------------


def test_ofd_hand_value():
  t = jnp.array([[[[2.0, -5.0, -0.5, 0.5]]]])   # [1, 1, 1, 4]
  s = jnp.array([[[[1.0, -2.0, -9.0, 0.5]]]])
  margin = jnp.array([-1.0, -3.0, -1.0, -1.0])
  # ch0: t>0: (1-2)^2 = 1; ch1: t' = -3, s > t': 1; ch2: t' = -0.5, s < t' <= 0: free;
  # ch3: equal: 0.
  np.testing.assert_allclose(ofd(s, t, margin), [2.0])


@pytest.mark.parametrize("shape", [(3, 4, 4, 5), (4, 6)])
def test_ofd_matches_reference(shape):
  s, t = _rng_maps(1, shape, 2.0)
  margin = -np.abs(np.random.default_rng(2).normal(size=shape[-1])).astype(np.float32)
  np.testing.assert_allclose(ofd(s, t, margin), ref_ofd(s, t, margin), rtol=1e-5)


def test_ofd_where_equals_slicing_and_masked_rows_get_no_gradient():
  s, t = _rng_maps(3, (5, 3, 3, 4))
  margin = jnp.full((4,), -0.7)
  where = np.array([True, False, True, True, False])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where], t_bad[~where] = np.nan, np.inf
  values = ofd(s_bad, t_bad, margin, where=where)
  np.testing.assert_allclose(values[where], ofd(s[where], t[where], margin), rtol=1e-6)
  assert np.all(np.asarray(values)[~where] == 0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(ofd(x, t_bad, margin, where=where))))(s_bad)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)
  assert np.any(np.asarray(grad)[where] != 0)


def test_ofd_gradient_matches_finite_differences_and_extremes():
  s, t = _rng_maps(4, (2, 2, 2, 3))
  margin = jnp.array([-0.5, -1.0, -0.2])
  grad = jax.jit(jax.grad(lambda x: jnp.sum(ofd(x, t, margin))))(s)
  expected = np.zeros_like(s, np.float64)
  eps = 1e-3
  for index in np.ndindex(s.shape):
    up, down = s.astype(np.float64).copy(), s.astype(np.float64).copy()
    up[index] += eps
    down[index] -= eps
    expected[index] = (ref_ofd(up, t, margin).sum() - ref_ofd(down, t, margin).sum()) / (2 * eps)
  np.testing.assert_allclose(grad, expected, rtol=1e-2, atol=1e-3)
  big = ofd(s * 1e15, t * 1e15, margin)
  assert np.all(np.isfinite(big))
  huge = ofd(s * 1e30, -t * 1e30, margin)  # squares overflow float32: inf, never NaN
  assert not np.any(np.isnan(huge))
  # Identical features, and all-zero rows: exactly 0, finite gradients.
  zero = jnp.zeros((2, 2, 2, 3))
  np.testing.assert_array_equal(ofd(zero, zero, margin), [0.0, 0.0])
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda x: jnp.sum(ofd(x, zero, margin))))(zero)))
  np.testing.assert_array_equal(ofd(jnp.asarray(t), t, margin), [0.0, 0.0])


def test_ofd_bf16_computes_in_float32():
  s, t = _rng_maps(5, (2, 2, 2, 3))
  margin = jnp.array([-0.5, -1.0, -0.2])
  value = ofd(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), margin)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, ref_ofd(np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64),
                                            np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64),
                                            margin), rtol=1e-5)


def test_ofd_shape_errors():
  with pytest.raises(ValueError, match=r"ofd: student_preact_mapped shape \(2, 4, 4, 3\) and "
                                       r"teacher_preact shape \(2, 4, 4, 6\) differ.*connector"):
    ofd(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 6)), jnp.zeros(6))
  with pytest.raises(ValueError, match=r"ofd: margin must have shape \(6,\).*got shape \(3,\)"):
    ofd(jnp.ones((2, 4, 4, 6)), jnp.ones((2, 4, 4, 6)), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"ofd: where must have shape \(2,\)"):
    ofd(jnp.ones((2, 6)), jnp.ones((2, 6)), jnp.zeros(6), where=jnp.ones(3, bool))


# --- hcl ------------------------------------------------------------------------------------


def test_hcl_hand_values():
  s = jnp.zeros((1, 2, 2, 1))
  t = jnp.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 2, 2, 1)
  # 2x2: levels 4 and 2 are skipped (>= H), level 1 weight 1/2: (1 + 0.5 * 0) / 1.5.
  np.testing.assert_allclose(hcl(s, t), [2.0 / 3.0], rtol=1e-6)
  # 8x8 of a constant offset 1: every level has mse 1: (1 + 1/2 + 1/4 + 1/8) / 1.875 = 1.
  np.testing.assert_allclose(hcl(jnp.ones((1, 8, 8, 2)), jnp.zeros((1, 8, 8, 2))), [1.0])
  # A [B, C] embedding is a 1x1 map: the plain MSE.
  np.testing.assert_allclose(hcl(jnp.array([[1.0, 3.0]]), jnp.zeros((1, 2))), [5.0])


def test_hcl_matches_reference_and_sums_over_stages():
  # 8x8: every level; 5x5 and 6x3 (non-square): PyTorch's overlapping adaptive windows;
  # 1x1: the plain MSE.
  shapes = [(2, 8, 8, 2), (2, 5, 5, 2), (2, 6, 3, 2), (2, 1, 1, 3)]
  pairs = [_rng_maps(6 + i, shape) for i, shape in enumerate(shapes)]
  students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
  expected = sum(ref_hcl(s, t) for s, t in pairs)
  np.testing.assert_allclose(hcl(students, teachers), expected, rtol=1e-5)
  # A [B, C] embedding is the 1x1 map.
  np.testing.assert_allclose(hcl(students[3][:, 0, 0], teachers[3][:, 0, 0]),
                             ref_hcl(*pairs[3]), rtol=1e-5)


def test_hcl_where_equals_slicing_and_masked_rows_get_no_gradient():
  s, t = _rng_maps(11, (4, 8, 8, 3))
  where = np.array([False, True, True, False])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where], t_bad[~where] = np.inf, np.nan
  values = hcl([s_bad], [t_bad], where=where)
  np.testing.assert_allclose(values[where], hcl(s[where], t[where]), rtol=1e-6)
  assert np.all(np.asarray(values)[~where] == 0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(hcl(x, t_bad, where=where))))(s_bad)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)
  assert np.any(np.asarray(grad)[where] != 0)
  zero = jnp.zeros((2, 8, 8, 3))
  np.testing.assert_array_equal(hcl(zero, zero), [0.0, 0.0])
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda x: jnp.sum(hcl(x, zero))))(zero)))
  assert not np.any(np.isnan(hcl(s * 1e30, t * 1e30)))


def test_hcl_errors():
  with pytest.raises(ValueError, match=r"hcl: student_features\[1\] shape \(2, 4, 4, 3\) and "
                                       r"teacher_features\[1\] shape \(2, 4, 4, 5\) differ"):
    hcl([jnp.ones((2, 2)), jnp.ones((2, 4, 4, 3))], [jnp.ones((2, 2)), jnp.ones((2, 4, 4, 5))])
  with pytest.raises(ValueError, match=r"hcl: got 2 student and 1 teacher maps"):
    hcl([jnp.ones((2, 2))] * 2, [jnp.ones((2, 2))])
  with pytest.raises(ValueError, match=r"hcl: student_features must be a \[B, H, W, C\] map"):
    hcl(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)))
  with pytest.raises(TypeError, match=r"hcl: student_features and teacher_features must both"):
    hcl([jnp.ones((2, 2))], jnp.ones((2, 2)))


# --- slow: the official functions re-implemented in PyTorch / scipy ------------------------


@pytest.mark.slow
def test_against_torch_and_scipy_reimplementations():
  import torch
  import torch.nn.functional as F
  from scipy.stats import norm

  rng = np.random.default_rng(12)
  gamma = rng.uniform(0.1, 2.0, 16) * rng.choice([-1, 1], 16)
  beta = rng.normal(size=16) * 2
  beta[0] = 4 * abs(gamma[0])  # the fallback branch
  margins = []
  for g, m in zip(gamma, beta):  # get_margin_from_BN with scipy's norm.cdf
    s = abs(g)
    cdf = norm.cdf(-m / s)
    margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m
                   if cdf > 0.001 else -3 * s)
  margins = np.array(margins)
  np.testing.assert_allclose(ofd_margin(gamma.astype(np.float32), beta.astype(np.float32)),
                             margins, rtol=2e-5, atol=1e-6)

  s, t = _rng_maps(13, (4, 8, 8, 16), 2.0)
  ts, tt = torch.tensor(s).permute(0, 3, 1, 2), torch.tensor(t).permute(0, 3, 1, 2)
  tm = torch.tensor(margins, dtype=torch.float32).view(1, -1, 1, 1)
  target = torch.max(tt, tm)  # distillation_loss of the official code, summed per example
  loss = F.mse_loss(ts, target, reduction="none") * ((ts > target) | (target > 0)).float()
  np.testing.assert_allclose(ofd(s, t, margins.astype(np.float32)),
                             loss.sum(dim=(1, 2, 3)).numpy(), rtol=1e-5)

  for shape in [(4, 8, 8, 3), (4, 5, 5, 2), (4, 2, 2, 3), (4, 1, 1, 6)]:
    s, t = _rng_maps(14, shape)
    fs, ft = torch.tensor(s).permute(0, 3, 1, 2), torch.tensor(t).permute(0, 3, 1, 2)
    h = fs.shape[2]
    expected, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
    for level in (4, 2, 1):
      if level >= h:
        continue
      cnt /= 2.0
      expected = expected + cnt * F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)),
                                             F.adaptive_avg_pool2d(ft, (level, level)))
      tot += cnt
    np.testing.assert_allclose(jnp.mean(hcl(s, t)), (expected / tot).item(), rtol=1e-5)
