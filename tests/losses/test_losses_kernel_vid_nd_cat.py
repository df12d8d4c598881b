"""CC, NST, VID, ND and CAT-KD losses against float64 numpy references written loop by loop
from the papers and their official code, plus hand-checked values, masks, gradients and
extreme inputs."""

from __future__ import annotations

import doctest
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses as losses_package
from kdjax.losses import class_attention, kernel, norm_direction

vid_module = importlib.import_module("kdjax.losses.variational")

cc_loss, nst_loss = kernel.correlation_congruence, kernel.nst
vid_loss, nd_loss, cat_loss = vid_module.vid, norm_direction.nd, class_attention.cat_kd

# --- float64 numpy references ------------------------------------------------------------------


def ref_unit(v, eps=1e-12):  # torch.nn.functional.normalize
  return v / max(np.linalg.norm(v), eps)


def ref_correlation_congruence(s, t, gamma=0.4, order=2):
  b = len(s)

  def kernel_matrix(x):
    x = x.reshape(b, -1)
    k = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        # The exact RBF on unit vectors is exp(-gamma ||xi - xj||^2); its Taylor series:
        dot = ref_unit(x[i]) @ ref_unit(x[j])
        k[i, j] = math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * dot**p
                                             for p in range(order + 1))
    return k

  return np.sum((kernel_matrix(s) - kernel_matrix(t)) ** 2) / b**2


def ref_nst(s, t):
  out = []
  for fs, ft in zip(s, t):
    ps = [ref_unit(fs[..., c].reshape(-1)) for c in range(fs.shape[-1])]
    pt = [ref_unit(ft[..., c].reshape(-1)) for c in range(ft.shape[-1])]
    mean_k = lambda a, b: np.mean([(x @ y) ** 2 for x in a for y in b])
    out.append(mean_k(pt, pt) + mean_k(ps, ps) - 2 * mean_k(ps, pt))
  return np.array(out)


def ref_vid(mean, t, alpha, eps=1e-5):
  variance = np.log1p(np.exp(alpha)) + eps  # RepDistiller: log(1 + exp(log_scale)) + eps
  nll = 0.5 * ((mean - t) ** 2 / variance + np.log(variance))
  return nll.reshape(len(mean), -1).mean(axis=1)


def ref_nd(s, t, means, labels):
  out = []
  for si, ti, y in zip(s, t, labels):  # DirectNormLoss.project_center, one row at a time
    e = means[y] / np.linalg.norm(means[y])
    out.append(1 - si @ e / max(np.linalg.norm(si), np.linalg.norm(ti)))
  return np.array(out)


def ref_adaptive_pool(x, r):
  b, h, w, k = x.shape
  out = np.zeros((b, r, r, k))
  for i in range(r):
    for j in range(r):
      h0, h1 = (i * h) // r, math.ceil((i + 1) * h / r)
      w0, w1 = (j * w) // r, math.ceil((j + 1) * w / r)
      out[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
  return out


def ref_cat_kd(s, t, resolution=2, normalize=False):
  ps, pt = ref_adaptive_pool(s, resolution), ref_adaptive_pool(t, resolution)
  if normalize:
    for p in (ps, pt):
      for i in range(len(p)):
        for k in range(p.shape[-1]):
          p[i, :, :, k] = p[i, :, :, k] / max(np.linalg.norm(p[i, :, :, k]), 1e-12)
  return ((ps - pt) ** 2).reshape(len(s), -1).mean(axis=1)


# --- the cases: (loss(s, t, where=...), reference(s, t), student shape, teacher shape) ---------

_RNG = np.random.default_rng(10)
ALPHA = _RNG.normal(size=(5,))
MEANS = _RNG.normal(size=(4, 7))
LABELS = np.array([0, 3, 1, 1, 2, 0], np.int32)

# Jitted once per case: one compilation per shape instead of one per eager op keeps the
# suite fast on a shared CPU (the checks of the losses' own jit-compatibility included).
PER_EXAMPLE = {
    "nst": (jax.jit(nst_loss), ref_nst, (6, 3, 3, 4), (6, 3, 3, 5)),
    "vid": (jax.jit(lambda s, t, where=None: vid_loss(s, t, jnp.asarray(ALPHA, s.dtype),
                                                      where=where)),
            lambda s, t: ref_vid(s, t, ALPHA), (6, 2, 2, 5), (6, 2, 2, 5)),
    "nd": (jax.jit(lambda s, t, where=None: nd_loss(s, t, jnp.asarray(MEANS, s.dtype), LABELS,
                                                    where=where)),
           lambda s, t: ref_nd(s, t, MEANS, LABELS), (6, 7), (6, 7)),
    "cat_kd": (jax.jit(lambda s, t, where=None: cat_loss(s, t, normalize=True, where=where)),
               lambda s, t: ref_cat_kd(s, t, normalize=True), (6, 5, 5, 3), (6, 8, 8, 3)),
}
RELATIONAL = {
    "correlation_congruence": (jax.jit(cc_loss), ref_correlation_congruence, (6, 7),
                               (6, 2, 2, 3)),
}
ALL = {**PER_EXAMPLE, **RELATIONAL}
# Further settings, checked against the reference only.
VARIANTS = {
    "correlation_congruence_order4": (
        jax.jit(functools.partial(cc_loss, gamma=1.3, order=4)),
        lambda s, t: ref_correlation_congruence(s, t, 1.3, 4), (6, 7), (6, 9)),
}


def _features(seed, shape_s, shape_t):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape_s), rng.normal(size=shape_t)


@pytest.mark.parametrize("name", {**ALL, **VARIANTS})
def test_matches_the_float64_reference(name):
  loss, reference, shape_s, shape_t = {**ALL, **VARIANTS}[name]
  s, t = _features(0, shape_s, shape_t)
  expected = reference(s, t)
  with jax.enable_x64(True):  # float32 inputs: test_bf16_inputs_compute_in_float32.
    got = loss(jnp.asarray(s), jnp.asarray(t))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  assert got.shape == (() if "congruence" in name else (shape_s[0],))
  assert np.all(np.abs(expected) > 1e-3)  # A non-trivial value, not 0 == 0.


@pytest.mark.parametrize("name", ALL)
def test_where_equals_the_selected_rows_alone_and_gradients_match_finite_differences(name):
  loss, _, shape_s, shape_t = ALL[name]
  s, t = _features(2, shape_s, shape_t)
  where = np.array([True, False, True, True, False, True])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where], t_bad[~where] = np.nan, np.inf
  with jax.enable_x64(True):
    masked = loss(jnp.asarray(s_bad), jnp.asarray(t_bad), where=jnp.asarray(where))
    if name in PER_EXAMPLE:
      alone = loss(jnp.asarray(s), jnp.asarray(t))[where]  # Per-example: rows independent.
      np.testing.assert_allclose(masked[where], alone, rtol=1e-12)
      assert np.all(np.asarray(masked)[~where] == 0)
    else:
      alone = loss(jnp.asarray(s[where]), jnp.asarray(t[where]))
      np.testing.assert_allclose(masked, alone, rtol=1e-12)
    masked_sum = lambda x: jnp.sum(loss(x, jnp.asarray(t_bad), where=jnp.asarray(where)))
    grads = jax.grad(masked_sum)(jnp.asarray(s_bad))
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~where] == 0)
    assert np.any(np.asarray(grads)[where] != 0)
    # Finite differences along random directions (the NaN rows move too, and count for
    # nothing on either side).
    check_grads(masked_sum, (jnp.asarray(s_bad),), order=1, modes=["rev"], atol=1e-5,
                rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_duplicate_zero_and_huge_rows_stay_finite(name):
  loss, _, shape_s, shape_t = ALL[name]
  s, t = _features(4, shape_s, shape_t)
  s[1], t[1] = s[0], t[0]  # Duplicates.
  s[2], t[3] = 0.0, 0.0  # All-zero rows (dead ReLU features).
  t[2] = 0.0  # Student and teacher both zero (ND's max-norm denominator).
  s[4] *= 1e4
  t[5] *= -1e4
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  value, grads = jax.value_and_grad(lambda x: jnp.sum(loss(x, t)))(s)
  assert np.isfinite(value) and np.all(np.isfinite(grads)), (value, grads)


def test_bf16_inputs_compute_in_float32():
  for name, (loss, reference, shape_s, shape_t) in ALL.items():
    s, t = _features(1, shape_s, shape_t)
    got = loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert got.dtype == jnp.float32, name
    s16 = np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64)
    t16 = np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(got, reference(s16, t16), rtol=2e-3, atol=1e-5, err_msg=name)


def test_hand_checked_values():
  cc, nst, vid, nd, cat = (jax.jit(f, static_argnames=names) for f, names in (
      (cc_loss, ("gamma", "order")), (nst_loss, ()), (vid_loss, ()), (nd_loss, ()),
      (cat_loss, ("normalize", "resolution"))))
  # CC, two examples, gamma 0.5: student rows orthogonal (dot 0), teacher rows at 60 degrees
  # (dot 1/2). Off-diagonal kernels e^-1 * 1 and e^-1 * (1 + 1/2 + 1/8); diagonals equal.
  s = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  t = jnp.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
  expected = 2 * (math.exp(-1) * (1 - 1.625)) ** 2 / 4
  np.testing.assert_allclose(cc(s, t, gamma=0.5), expected, rtol=1e-6)
  # With order 0 every kernel is exp(-2 gamma): nothing to match.
  assert float(cc(s, t, gamma=0.5, order=0)) == 0.0
  # NST: student one channel [1, 0]; teacher two channels [1, 0] and [0, 1] (HW = 2).
  # k_tt mean = (1 + 0 + 0 + 1) / 4 = 1/2; k_ss = 1; k_st mean = (1 + 0) / 2 = 1/2.
  fs = jnp.array([[[1.0], [0.0]]])
  ft = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(nst(fs, ft), [0.5 + 1 - 1])
  # VID: alpha with softplus 3 (eps 1e-5), error 2 in both positions of one channel:
  # 0.5 * (4 / (3 + 1e-5) + log(3 + 1e-5)).
  alpha = jnp.log(jnp.expm1(jnp.array([3.0])))
  expected = 0.5 * (4 / (3 + 1e-5) + math.log(3 + 1e-5))
  np.testing.assert_allclose(vid(jnp.zeros((1, 2, 1)), jnp.full((1, 2, 1), 2.0), alpha),
                             [expected], rtol=1e-6)
  # ND: the centre (0, 5) points along y; student (3, 4) (norm 5), teacher norm 10:
  # 1 - 4 / 10. A student longer than the teacher along the centre: 1 - 20 / 20 = 0.
  means = jnp.array([[0.0, 5.0]])
  got = nd(jnp.array([[3.0, 4.0], [0.0, 20.0]]), jnp.array([[6.0, 8.0], [1.0, 0.0]]),
                means, jnp.array([0, 0]))
  np.testing.assert_allclose(got, [0.6, 0.0], rtol=1e-6)
  # CAT-KD: a 4x4 map pooled to 2x2 averages 2x2 blocks; teacher zeros.
  cam = jnp.arange(16.0).reshape(1, 4, 4, 1)  # blocks' means 2.5, 4.5, 10.5, 12.5
  expected = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4
  np.testing.assert_allclose(cat(cam, jnp.zeros((1, 4, 4, 1))), [expected])
  # Normalised: both pooled maps become unit vectors; opposite signs give |a - (-a)|^2 = 4.
  np.testing.assert_allclose(cat(cam, -cam, normalize=True), [4.0 / 4], rtol=1e-6)


def test_adaptive_pool_matches_pytorch_bins_for_odd_sizes():
  x = np.random.default_rng(6).normal(size=(2, 5, 7, 3))
  with jax.enable_x64(True):
    got = class_attention.adaptive_average_pool(jnp.asarray(x), 3)
  np.testing.assert_allclose(got, ref_adaptive_pool(x, 3), rtol=1e-12)


def test_mismatched_shapes_and_bad_hyper_parameters_say_what_is_allowed():
  with pytest.raises(ValueError, match=r"nst: student_features shape \(2, 8, 8, 3\) and "
                                       r"teacher_features shape \(2, 4, 4, 3\) must have the "
                                       r"same batch and spatial sizes.*pool"):
    nst_loss(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"vid: student_mean shape \(2, 4, 4, 8\) and "
                                       r"teacher_features shape \(2, 4, 4, 16\) differ.*"
                                       r"regressor"):
    vid_loss(jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 4, 4, 16)), jnp.zeros(16))
  with pytest.raises(ValueError, match=r"vid: alpha must have shape \(16,\)"):
    vid_loss(jnp.zeros((2, 16)), jnp.zeros((2, 16)), jnp.zeros(8))
  with pytest.raises(ValueError, match=r"nd: student_embedding shape \(2, 8\) and "
                                       r"teacher_embedding shape \(2, 16\).*connector"):
    nd_loss(jnp.zeros((2, 8)), jnp.zeros((2, 16)), jnp.zeros((3, 16)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"nd: labels must lie in \[0, 3\)"):
    nd_loss(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.array([0, 3]))
  with pytest.raises(ValueError, match=r"cat_kd: .*same B and number of classes K"):
    cat_loss(jnp.zeros((2, 4, 4, 10)), jnp.zeros((2, 4, 4, 100)))
  with pytest.raises(ValueError, match=r"cat_kd: resolution must be a Python int in \[1, 2\]"):
    cat_loss(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 2, 2, 3)), resolution=4)
  with pytest.raises(ValueError, match=r"correlation_congruence: order must be a Python int"):
    cc_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), order=1.5)
  with pytest.raises(ValueError, match=r"correlation_congruence: gamma must be > 0"):
    cc_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), gamma=0.0)
  with pytest.raises(ValueError, match=r"correlation_congruence: where must have shape \(2,\)"):
    cc_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones(3, bool))


@pytest.mark.slow
def test_matches_pytorch_formulations_of_the_official_code():
  """The official code's conventions, restated with PyTorch ops (adaptive_avg_pool2d's bins,
  F.normalize, NCHW layout, batch means): kdjax's per-example values averaged over the batch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  nchw = lambda x: torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
  mean64 = lambda x: float(np.mean(np.asarray(x)))
  with jax.enable_x64(True):
    # NST: pool the larger map to the smaller one, normalise each channel's pattern, MMD.
    s, t = rng.normal(size=(4, 6, 6, 3)), rng.normal(size=(4, 6, 6, 5))
    fs = F.normalize(nchw(s).flatten(2), dim=2)
    ft = F.normalize(nchw(t).flatten(2), dim=2)
    poly = lambda a, b: (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
    expected = (poly(ft, ft).mean() + poly(fs, fs).mean() - 2 * poly(fs, ft).mean()).item()
    np.testing.assert_allclose(mean64(nst_loss(jnp.asarray(s), jnp.asarray(t))), expected,
                               rtol=1e-10)
    # VID: variance log(1 + exp(alpha)) + eps per channel, torch.mean of the NLL.
    mean, t, alpha = rng.normal(size=(4, 3, 3, 5)), rng.normal(size=(4, 3, 3, 5)), rng.normal(
        size=5)
    variance = (torch.log(1 + torch.exp(torch.from_numpy(alpha))) + 1e-5).view(1, -1, 1, 1)
    expected = torch.mean(0.5 * ((nchw(mean) - nchw(t)) ** 2 / variance
                                 + torch.log(variance))).item()
    np.testing.assert_allclose(mean64(vid_loss(jnp.asarray(mean), jnp.asarray(t),
                                               jnp.asarray(alpha))), expected, rtol=1e-10)
    # ND: 1 - <s, c / |c|> / max(|s|, |t|), averaged.
    s, t, means = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), rng.normal(size=(3, 8))
    labels = np.array([0, 1, 2, 2, 1, 0])
    total = 0.0
    for si, ti, y in zip(torch.from_numpy(s), torch.from_numpy(t), labels):
      centre = torch.from_numpy(means[y])
      total += 1 - torch.dot(si, centre / centre.norm(p=2)) / max(si.norm(p=2), ti.norm(p=2))
    np.testing.assert_allclose(mean64(nd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(means),
                                              labels)), total.item() / 6, rtol=1e-10)
    # CAT-KD: adaptive_avg_pool2d to r x r (overlapping bins for 7 -> 3), optional
    # F.normalize over the spatial dims, F.mse_loss.
    s, t = rng.normal(size=(4, 7, 7, 5)), rng.normal(size=(4, 5, 5, 5))
    for resolution, normalize in ((3, False), (2, True)):
      ps = F.adaptive_avg_pool2d(nchw(s), (resolution, resolution))
      pt = F.adaptive_avg_pool2d(nchw(t), (resolution, resolution))
      if normalize:
        ps, pt = F.normalize(ps, dim=(2, 3)), F.normalize(pt, dim=(2, 3))
      got = mean64(cat_loss(jnp.asarray(s), jnp.asarray(t), resolution=resolution,
                            normalize=normalize))
      np.testing.assert_allclose(got, F.mse_loss(ps, pt).item(), rtol=1e-10)
    # CC: the Taylor kernel on F.normalize'd rows, F.mse_loss between the matrices.
    s, t = rng.normal(size=(6, 7)), rng.normal(size=(6, 9))

    def kernel_matrix(x, gamma=0.4, order=2):
      similarity = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
      return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * similarity ** p
                 for p in range(order + 1))

    expected = F.mse_loss(kernel_matrix(torch.from_numpy(s)),
                          kernel_matrix(torch.from_numpy(t))).item()
    np.testing.assert_allclose(float(cc_loss(jnp.asarray(s), jnp.asarray(t))), expected,
                               rtol=1e-10)
