"""Tests for kdjax.losses.logit against independent float64 numpy references.

The references below never call kdjax: they work on probabilities, row by row,
with the formulas written out as in the papers / official code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses


# ----------------------------------------------------------------------------
# float64 numpy references.
# ----------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(p / q), 0.0)
  return terms.sum(axis=-1)


def rows(fn):
  """Applies a per-row reference `fn(*row_arrays) -> float` over leading axes."""

  def wrapped(*arrays, lead_shape):
    flat = [np.asarray(a).reshape((-1,) + np.asarray(a).shape[len(lead_shape):])
            for a in arrays]
    out = [fn(*(a[i] for a in flat)) for i in range(flat[0].shape[0])]
    return np.asarray(out, np.float64).reshape(lead_shape)

  return wrapped


def ref_kd(s, t, temperature):
  return temperature**2 * np_kl(np_softmax(t / temperature),
                                np_softmax(s / temperature))


def ref_forward_kl(s, t, temperature=1.0):
  return np_kl(np_softmax(t / temperature), np_softmax(s / temperature))


def ref_reverse_kl(s, t, temperature=1.0):
  return np_kl(np_softmax(s / temperature), np_softmax(t / temperature))


def ref_generalized_jsd(s, t, beta, temperature=1.0):
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  if beta == 0:
    return np_kl(pt, ps)
  if beta == 1:
    return np_kl(ps, pt)
  m = beta * pt + (1 - beta) * ps
  return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


def ref_skew_forward_kl(s, t, alpha, temperature=1.0):
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  return np_kl(pt, alpha * pt + (1 - alpha) * ps)


def ref_skew_reverse_kl(s, t, alpha, temperature=1.0):
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  return np_kl(ps, alpha * ps + (1 - alpha) * pt)


def ref_total_variation(s, t, temperature=1.0):
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  return 0.5 * np.abs(pt - ps).sum(axis=-1)


@rows
def ref_dkd_row(s, t, y, alpha=1.0, beta=8.0, temperature=4.0):
  y = int(y)
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  tckd = np_kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
  qs = np_softmax(np.delete(s, y) / temperature)
  qt = np_softmax(np.delete(t, y) / temperature)
  return temperature**2 * (alpha * tckd + beta * np_kl(qt, qs))


def ref_standardize(z, eps=1e-7):
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True)
                                            + eps)


def ref_taid(s, t, tau):
  target = np_softmax((1 - tau) * s + tau * t)
  return np_kl(target, np_softmax(s))


def ref_multi_teacher_kd(s, ts, weights, temperatures):
  total = 0.0
  for n in range(ts.shape[0]):
    temp = temperatures[n]
    total = total + weights[n] * temp**2 * np_kl(np_softmax(ts[n] / temp),
                                                 np_softmax(s / temp))
  return total


# ----------------------------------------------------------------------------
# Registry: how to build arguments for each loss and what it should equal.
# ----------------------------------------------------------------------------


class Case(NamedTuple):
  fn: Callable  # (*arrays, where=None) -> jax.Array
  ref: Callable  # (*np arrays, lead_shape) -> np.ndarray
  make: Callable  # (rng, lead_shape, num_classes) -> tuple of np arrays
  float_args: Tuple[int, ...]  # positions of differentiable (logit) arrays
  lead_axis: Tuple[int, ...]  # axis where each array's leading dims start


def _pair(rng, lead, c):
  s = rng.normal(size=lead + (c,)) * 2.0
  t = rng.normal(size=lead + (c,)) * 2.0
  return s, t


def _labelled(rng, lead, c):
  s, t = _pair(rng, lead, c)
  return s, t, rng.integers(0, c, size=lead).astype(np.int32)


def _topk(rng, lead, c, k=4):
  s, t = _pair(rng, lead, c)
  idx = np.argsort(-t, axis=-1)[..., :k].astype(np.int32)
  return s, np.take_along_axis(t, idx, axis=-1), idx


def _multi(rng, lead, c):
  s = rng.normal(size=lead + (c,)) * 2.0
  return s, rng.normal(size=(3,) + lead + (c,)) * 2.0


def _pair_ref(ref):
  return lambda s, t, lead_shape: ref(s, t)


MULTI_WEIGHTS = (0.5, 0.3, 0.2)
MULTI_TEMPS = (1.0, 2.0, 4.0)

CASES = {
    "kd": Case(
        lambda s, t, **kw: losses.kd(s, t, temperature=2.0, **kw),
        _pair_ref(lambda s, t: ref_kd(s, t, 2.0)), _pair, (0, 1), (0, 0)),
    "forward_kl": Case(
        lambda s, t, **kw: losses.forward_kl(s, t, temperature=1.5, **kw),
        _pair_ref(lambda s, t: ref_forward_kl(s, t, 1.5)), _pair, (0, 1),
        (0, 0)),
    "reverse_kl": Case(
        lambda s, t, **kw: losses.reverse_kl(s, t, **kw),
        _pair_ref(ref_reverse_kl), _pair, (0, 1), (0, 0)),
    "generalized_jsd": Case(
        lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.3,
                                                  temperature=2.0, **kw),
        _pair_ref(lambda s, t: ref_generalized_jsd(s, t, 0.3, 2.0)), _pair,
        (0, 1), (0, 0)),
    "skew_forward_kl": Case(
        lambda s, t, **kw: losses.skew_forward_kl(s, t, alpha=0.1, **kw),
        _pair_ref(lambda s, t: ref_skew_forward_kl(s, t, 0.1)), _pair, (0, 1),
        (0, 0)),
    "skew_reverse_kl": Case(
        lambda s, t, **kw: losses.skew_reverse_kl(s, t, alpha=0.2,
                                                  temperature=0.5, **kw),
        _pair_ref(lambda s, t: ref_skew_reverse_kl(s, t, 0.2, 0.5)), _pair,
        (0, 1), (0, 0)),
    "total_variation": Case(
        lambda s, t, **kw: losses.total_variation(s, t, **kw),
        _pair_ref(ref_total_variation), _pair, (0, 1), (0, 0)),
    "dkd": Case(
        lambda s, t, y, **kw: losses.dkd(s, t, y, alpha=1.0, beta=8.0,
                                         temperature=4.0, **kw),
        lambda s, t, y, lead_shape: ref_dkd_row(s, t, y,
                                                lead_shape=lead_shape),
        _labelled, (0, 1), (0, 0, 0)),
    "nkd": Case(
        lambda s, t, y, **kw: losses.nkd(s, t, y, temperature=2.0, gamma=1.5,
                                         **kw),
        lambda s, t, y, lead_shape: _nkd_ref(s, t, y, lead_shape),
        _labelled, (0, 1), (0, 0, 0)),
    "taid": Case(
        lambda s, t, **kw: losses.taid(s, t, t=0.4, **kw),
        _pair_ref(lambda s, t: ref_taid(s, t, 0.4)), _pair, (1,), (0, 0)),
    "sparse_kd": Case(
        lambda s, v, i, **kw: losses.sparse_kd(s, v, i, temperature=2.0, **kw),
        lambda s, v, i, lead_shape: _sparse_ref(s, v, i, lead_shape),
        _topk, (0, 1), (0, 0, 0)),
    "multi_teacher_kd": Case(
        lambda s, ts, **kw: losses.multi_teacher_kd(
            s, ts, weights=MULTI_WEIGHTS, temperatures=MULTI_TEMPS, **kw),
        lambda s, ts, lead_shape: ref_multi_teacher_kd(
            s, ts, MULTI_WEIGHTS, MULTI_TEMPS),
        _multi, (0, 1), (0, 1)),
}


def _nkd_ref(s, t, y, lead_shape):
  # Transcribed from yzd-v/cls_KD mmcls/models/dis_losses/nkd.py, per example,
  # with temperature 2 and gamma 1.5.
  flat_s = s.reshape(-1, s.shape[-1])
  flat_t = t.reshape(-1, t.shape[-1])
  flat_y = y.reshape(-1)
  out = []
  for i in range(flat_s.shape[0]):
    yi = int(flat_y[i])
    loss_t = -np_softmax(flat_t[i])[yi] * np.log(np_softmax(flat_s[i])[yi])
    qs = np_softmax(np.delete(flat_s[i], yi) / 2.0)
    qt = np_softmax(np.delete(flat_t[i], yi) / 2.0)
    out.append(loss_t - 1.5 * 2.0**2 * np.sum(qt * np.log(qs)))
  return np.asarray(out).reshape(lead_shape)


def _sparse_ref(s, v, i, lead_shape):
  flat = [a.reshape(-1, a.shape[-1]) for a in (s, v, i)]
  out = []
  for r in range(flat[0].shape[0]):
    pt = np_softmax(flat[1][r] / 2.0)
    log_ps = np.log(np_softmax(flat[0][r] / 2.0))
    out.append(4.0 * np.sum(pt * (np.log(pt) - log_ps[flat[2][r]])))
  return np.asarray(out).reshape(lead_shape)


ALL = sorted(CASES)
# Jitted versions keep the suite fast (eager mode compiles every op for every
# new shape); module-level so that tests with equal shapes share compilations.
JIT = {name: jax.jit(case.fn) for name, case in CASES.items()}


def _make_grad(case):
  def total(*arrays, **kwargs):
    return jnp.sum(case.fn(*arrays, **kwargs))
  return jax.jit(jax.grad(total, argnums=case.float_args))


JIT_GRAD = {name: _make_grad(case) for name, case in CASES.items()}


def _float64(arrays):
  return tuple(jnp.asarray(a) for a in arrays)


def _over_float_args(case, arrays, *, reduce=False, **kwargs):
  """The loss as a function of its float (logit) arguments only."""

  def fn(*float_arrays):
    args = list(arrays)
    for pos, a in zip(case.float_args, float_arrays):
      args[pos] = a
    out = case.fn(*args, **kwargs)
    return jnp.sum(out) if reduce else out

  return fn


def _lead_first(array, lead_axis):
  """A view with the two leading (batch, time) axes first."""
  return array if lead_axis == 0 else np.moveaxis(array, 0, -2)


def _lead_slice(array, lead_axis, index):
  """Indexes the (flattened) leading axes of `array` that start at lead_axis."""
  return array[(slice(None),) * lead_axis + (index,)]


# ----------------------------------------------------------------------------
# Values against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_matches_reference_dense(name):
  case = CASES[name]
  rng = np.random.default_rng(0)
  arrays = case.make(rng, (5,), 7)
  with jax.enable_x64(True):
    got = JIT[name](*_float64(arrays))
    assert got.shape == (5,)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, case.ref(*arrays, lead_shape=(5,)),
                               rtol=1e-10, atol=1e-12)
  got32 = JIT[name](*(jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else
                    jnp.asarray(a) for a in arrays))
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, case.ref(*arrays, lead_shape=(5,)),
                             rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ALL)
def test_matches_reference_masked_sequence(name):
  case = CASES[name]
  rng = np.random.default_rng(1)
  lead = (2, 3)
  arrays = case.make(rng, lead, 11)
  where = np.array([[True, False, True], [False, True, True]])
  with jax.enable_x64(True):
    got = JIT[name](*_float64(arrays), where=jnp.asarray(where))
    assert got.shape == lead
    expected = np.where(where, case.ref(*arrays, lead_shape=lead), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(got)[~where], 0.0)
    # A 0/1 integer mask means the same as the boolean one.
    got01 = JIT[name](*_float64(arrays), where=jnp.asarray(where, jnp.int32))
    np.testing.assert_array_equal(got01, got)


@pytest.mark.parametrize("name", ALL)
def test_masked_equals_sliced_and_zero_gradient(name):
  case = CASES[name]
  rng = np.random.default_rng(2)
  lead = (2, 4)
  arrays = list(case.make(rng, lead, 6))
  where = np.array([[True, True, False, True], [False, False, True, False]])
  # Poison the masked positions: nothing from them may reach values/gradients.
  for pos in case.float_args:
    a = np.array(arrays[pos])
    axis = case.lead_axis[pos]
    bad = _lead_first(a, axis)  # a view of `a`
    bad[~where, ..., 0] = np.nan if pos == 0 else np.inf
    bad[~where, ..., 1] = -np.inf
    arrays[pos] = a
  with jax.enable_x64(True):
    arrays_j = _float64(arrays)
    got = JIT[name](*arrays_j, where=jnp.asarray(where))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(np.asarray(got)[~where], 0.0)
    kept = np.flatnonzero(where.reshape(-1))
    sliced = []
    for a, axis in zip(arrays, case.lead_axis):
      a = np.asarray(a)
      flat = a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + len(lead):])
      sliced.append(jnp.asarray(_lead_slice(flat, axis, kept)))
    expected = JIT[name](*sliced)
    np.testing.assert_allclose(np.asarray(got)[where], expected, rtol=1e-12,
                               atol=1e-14)

    grads = JIT_GRAD[name](*arrays_j, where=jnp.asarray(where))
    for grad, pos in zip(grads, case.float_args):
      grad = _lead_first(np.asarray(grad), case.lead_axis[pos])
      assert np.all(np.isfinite(grad)), (name, pos)
      np.testing.assert_array_equal(grad[~where], 0.0)


@pytest.mark.parametrize("name", ALL)
def test_check_grads(name):
  case = CASES[name]
  rng = np.random.default_rng(3)
  arrays = case.make(rng, (3,), 5)
  where = jnp.asarray([True, False, True])
  with jax.enable_x64(True):
    arrays_j = _float64(arrays)
    check_grads(jax.jit(_over_float_args(case, arrays_j, where=where)),
                tuple(arrays_j[pos] for pos in case.float_args), order=1,
                modes=["rev"])


def test_taid_student_gradient_treats_target_as_constant():
  # The interpolated target uses stop_gradient(student), so d loss / d s is
  # softmax(s) - target, not the full derivative (check_grads would see that).
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
  with jax.enable_x64(True):
    grad = jax.grad(lambda x: losses.taid(x, jnp.asarray(t), t=0.3).sum())(
        jnp.asarray(s))
    target = np_softmax(0.7 * s + 0.3 * t)
    np.testing.assert_allclose(grad, np_softmax(s) - target, atol=1e-12)


def test_taid_endpoints():
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  with jax.enable_x64(True):
    s, t = jnp.asarray(s), jnp.asarray(t)
    np.testing.assert_allclose(losses.taid(s, t, t=1.0),
                               losses.forward_kl(s, t), atol=1e-12)
    np.testing.assert_allclose(losses.taid(s, t, t=0.0), 0.0, atol=1e-12)
    traced = jax.jit(lambda tau: losses.taid(s, t, t=tau))(0.25)
    np.testing.assert_allclose(traced, ref_taid(np.asarray(s), np.asarray(t),
                                                0.25), rtol=1e-10)


# ----------------------------------------------------------------------------
# Extreme inputs: finite values and finite gradients.
# ----------------------------------------------------------------------------


def _values_and_grads(name, arrays):
  arrays = [jnp.asarray(a) for a in arrays]
  return JIT[name](*arrays), JIT_GRAD[name](*arrays)


def _assert_finite(name, value, grads):
  assert np.all(np.isfinite(np.asarray(value, np.float64))), (name, value)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float64))), (name, g)


@pytest.mark.parametrize("name", ALL)
def test_large_magnitude_logits(name):
  case = CASES[name]
  rng = np.random.default_rng(6)
  arrays = [np.asarray(a) for a in case.make(rng, (2, 3), 8)]
  for pos in case.float_args:
    arrays[pos] = (arrays[pos] * 5e3).astype(np.float32)  # |z| ~ 1e4
  value, grads = _values_and_grads(name, arrays)
  assert value.dtype == jnp.float32
  _assert_finite(name, value, grads)


@pytest.mark.parametrize("name", ALL)
def test_one_hot_like_teacher(name):
  case = CASES[name]
  rng = np.random.default_rng(7)
  arrays = [np.asarray(a) for a in case.make(rng, (2, 3), 8)]
  for pos in case.float_args[1:] if name != "taid" else case.float_args:
    a = np.zeros_like(arrays[pos])
    a[..., 0] = 1e4
    arrays[pos] = a.astype(np.float32)
  arrays[0] = arrays[0].astype(np.float32)
  value, grads = _values_and_grads(name, arrays)
  _assert_finite(name, value, grads)


# Vocabulary positions that neither model may produce (logit -inf in both).
BANNED = [1, 4]


@pytest.mark.parametrize("name", ALL)
def test_shared_negative_infinity_logits(name):
  case = CASES[name]
  rng = np.random.default_rng(8)
  arrays = [np.asarray(a) for a in case.make(rng, (2, 3), 8)]
  if name == "sparse_kd":
    # Teacher kept classes avoid the banned ids; one kept logit is padding.
    arrays[2] = np.broadcast_to(np.array([0, 2, 5, 7], np.int32),
                                arrays[1].shape).copy()
    arrays[1] = arrays[1].copy()
    arrays[1][..., -1] = -np.inf
    arrays[0] = arrays[0].copy()
    arrays[0][..., BANNED] = -np.inf
  elif name in ("dkd", "nkd"):
    arrays[2] = np.where(np.isin(arrays[2], BANNED), 0, arrays[2])
    for pos in case.float_args:
      arrays[pos] = arrays[pos].copy()
      arrays[pos][..., BANNED] = -np.inf
  else:
    for pos in case.float_args + ((1,) if name == "taid" else ()):
      arrays[pos] = arrays[pos].copy()
      arrays[pos][..., BANNED] = -np.inf
    arrays[0][..., BANNED] = -np.inf
  arrays = [a.astype(np.float32) if a.dtype == np.float64 else a
            for a in arrays]
  value, grads = _values_and_grads(name, arrays)
  _assert_finite(name, value, grads)
  for g, pos in zip(grads, case.float_args):
    if name != "sparse_kd" or pos == 0:
      np.testing.assert_array_equal(np.asarray(g)[..., BANNED], 0.0)
  if name in ("sparse_kd", "dkd", "nkd"):
    return
  # Banning classes in both models is the same as deleting them.
  keep = [c for c in range(8) if c not in BANNED]
  reduced = [a[..., keep] for a in arrays]
  np.testing.assert_allclose(value, JIT[name](*map(jnp.asarray, reduced)),
                             rtol=1e-5, atol=1e-6)


def test_labelled_losses_with_banned_classes_equal_deleted_classes():
  rng = np.random.default_rng(9)
  s, t, y = _labelled(rng, (6,), 8)
  y = np.where(np.isin(y, BANNED), 3, y)
  keep = [c for c in range(8) if c not in BANNED]
  remap = {c: i for i, c in enumerate(keep)}
  y_reduced = np.array([remap[int(v)] for v in y], np.int32)
  s_banned, t_banned = s.copy(), t.copy()
  s_banned[..., BANNED] = -np.inf
  t_banned[..., BANNED] = -np.inf
  with jax.enable_x64(True):
    for fn in (losses.dkd, losses.nkd):
      np.testing.assert_allclose(
          fn(jnp.asarray(s_banned), jnp.asarray(t_banned), jnp.asarray(y)),
          fn(jnp.asarray(s[..., keep]), jnp.asarray(t[..., keep]),
             jnp.asarray(y_reduced)), rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_inputs_give_float32(name):
  case = CASES[name]
  rng = np.random.default_rng(10)
  arrays = [np.asarray(a) for a in case.make(rng, (2, 3), 8)]
  bf16 = [jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float64 else
          jnp.asarray(a) for a in arrays]
  value, grads = _values_and_grads(name, bf16)
  assert value.dtype == jnp.float32
  _assert_finite(name, value, grads)
  for g, pos in zip(grads, case.float_args):
    assert g.dtype == jnp.bfloat16  # gradients come back in the input dtype
  # fp32 math on the bf16-rounded values.
  f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in bf16]
  np.testing.assert_allclose(value, JIT[name](*f32), rtol=1e-6, atol=1e-6)


# Eager mode compiles op by op (slow), so only a representative subset.
@pytest.mark.parametrize(
    "name", ["dkd", "generalized_jsd", "multi_teacher_kd", "sparse_kd", "taid"])
def test_jit_matches_eager(name):
  case = CASES[name]
  rng = np.random.default_rng(11)
  arrays = [jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else
            jnp.asarray(a) for a in case.make(rng, (3, 2), 5)]
  where = jnp.asarray([[True, False], [True, True], [False, True]])
  eager = case.fn(*arrays, where=where)
  jitted = jax.jit(lambda *a: case.fn(*a[:-1], where=a[-1]))(*arrays, where)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Identities and limits.
# ----------------------------------------------------------------------------


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
  rng = np.random.default_rng(12)
  s, t = _pair(rng, (4, 3), 9)
  with jax.enable_x64(True):
    s, t = jnp.asarray(s), jnp.asarray(t)
    for kw in ({}, {"temperature": 2.0}):
      np.testing.assert_array_equal(losses.generalized_jsd(s, t, beta=0.0, **kw),
                                    losses.forward_kl(s, t, **kw))
      np.testing.assert_array_equal(losses.generalized_jsd(s, t, beta=1.0, **kw),
                                    losses.reverse_kl(s, t, **kw))
      np.testing.assert_array_equal(losses.generalized_jsd(s, t, beta=0, **kw),
                                    losses.forward_kl(s, t, **kw))
    jitted = jax.jit(lambda b: losses.generalized_jsd(s, t, beta=b))
    np.testing.assert_allclose(jitted(0.0), losses.forward_kl(s, t),
                               rtol=1e-12)
    np.testing.assert_allclose(jitted(1.0), losses.reverse_kl(s, t),
                               rtol=1e-12)
    np.testing.assert_allclose(
        jitted(0.3), ref_generalized_jsd(np.asarray(s), np.asarray(t), 0.3),
        rtol=1e-10)


def test_skew_kl_alpha_zero_is_plain_kl():
  rng = np.random.default_rng(13)
  s, t = map(jnp.asarray, _pair(rng, (5,), 6))
  np.testing.assert_array_equal(losses.skew_forward_kl(s, t, alpha=0.0),
                                losses.forward_kl(s, t))
  np.testing.assert_array_equal(losses.skew_reverse_kl(s, t, alpha=0.0),
                                losses.reverse_kl(s, t))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identity_with_kd(temperature):
  # KL(p_t||p_s) = TCKD + (1 - p_t[y]) NCKD (Zhao et al. 2022, eq. 6).
  rng = np.random.default_rng(14)
  s, t, y = _labelled(rng, (3, 4), 10)
  with jax.enable_x64(True):
    s, t, y = map(jnp.asarray, (s, t, y))
    tckd = losses.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=temperature)
    nckd = losses.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=temperature)
    p_target = np.take_along_axis(np_softmax(np.asarray(t) / temperature),
                                  np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        losses.kd(s, t, temperature=temperature),
        tckd + (1 - p_target) * nckd, rtol=1e-10)


def test_sparse_kd_with_all_classes_equals_kd():
  rng = np.random.default_rng(15)
  s, t = _pair(rng, (2, 3), 7)
  perm = np.argsort(rng.random((2, 3, 7)), axis=-1).astype(np.int32)
  with jax.enable_x64(True):
    got = losses.sparse_kd(jnp.asarray(s),
                           jnp.asarray(np.take_along_axis(t, perm, -1)),
                           jnp.asarray(perm), temperature=3.0)
    np.testing.assert_allclose(got, losses.kd(jnp.asarray(s), jnp.asarray(t),
                                              temperature=3.0), rtol=1e-12)


def test_sparse_kd_top_k_is_sharper_than_the_teacher():
  # Dropping the tail: against a student equal to the teacher, top-k KD is
  # not 0 (the renormalised target differs from the student's distribution).
  rng = np.random.default_rng(16)
  _, t = _pair(rng, (4,), 10)
  idx = np.argsort(-t, -1)[:, :3].astype(np.int32)
  loss = losses.sparse_kd(jnp.asarray(t, jnp.float32),
                          jnp.asarray(np.take_along_axis(t, idx, -1),
                                      jnp.float32), jnp.asarray(idx))
  assert np.all(np.asarray(loss) > 0)


def test_multi_teacher_defaults_and_single_teacher():
  rng = np.random.default_rng(17)
  s, ts = _multi(rng, (5,), 6)
  with jax.enable_x64(True):
    s_j, ts_j = jnp.asarray(s), jnp.asarray(ts)
    got = losses.multi_teacher_kd(s_j, ts_j)
    np.testing.assert_allclose(
        got, ref_multi_teacher_kd(s, ts, (1 / 3,) * 3, (4.0,) * 3), rtol=1e-10)
    np.testing.assert_allclose(
        losses.multi_teacher_kd(s_j, ts_j[:1], temperatures=2.0),
        losses.kd(s_j, ts_j[0], temperature=2.0), rtol=1e-12)
    np.testing.assert_allclose(
        losses.multi_teacher_kd(s_j, ts_j, weights=jnp.asarray([1.0, 0, 0]),
                                temperatures=jnp.asarray([3.0, 1.0, 1.0])),
        losses.kd(s_j, ts_j[0], temperature=3.0), rtol=1e-12)


def test_standardize_logits():
  rng = np.random.default_rng(18)
  z = rng.normal(size=(2, 3, 9)) * 3 + 1
  with jax.enable_x64(True):
    np.testing.assert_allclose(losses.standardize_logits(jnp.asarray(z)),
                               ref_standardize(z), rtol=1e-12)
    check_grads(losses.standardize_logits, (jnp.asarray(z),), order=1,
                modes=["rev"])
  # Constant rows: zeros, finite gradient; bf16 in, float32 out; 1e4 scale.
  const = jnp.full((2, 5), 3.0)
  np.testing.assert_array_equal(losses.standardize_logits(const), 0.0)
  g = jax.grad(lambda x: jnp.sum(losses.standardize_logits(x)**2 * 0.1 +
                                 losses.standardize_logits(x)))(const)
  assert np.all(np.isfinite(g))
  out = losses.standardize_logits(jnp.asarray(z * 1e4, jnp.bfloat16))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  # Composed with kd: invariant to a per-row scale and shift of the logits.
  s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  std = losses.standardize_logits
  np.testing.assert_allclose(
      losses.kd(std(jnp.asarray(s)), std(jnp.asarray(t)), temperature=2.0),
      losses.kd(std(jnp.asarray(3 * s + 7)), std(jnp.asarray(0.5 * t - 1)),
                temperature=2.0), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Hand-checked values.
# ----------------------------------------------------------------------------


def test_hand_checked_values():
  s = jnp.array([[1.0, 2.0, 3.0]])
  t = jnp.array([[3.0, 2.0, 1.0]])
  # softmax([1, 2, 3]) = (0.0900, 0.2447, 0.6652); the teacher is its reverse,
  # so log p_t - log p_s = t - s = (2, 0, -2) and
  # KL(p_t||p_s) = 0.6652 * 2 + 0.0900 * (-2) = 1.1504.
  np.testing.assert_allclose(losses.forward_kl(s, t), [1.1504], atol=1e-4)
  np.testing.assert_allclose(losses.kd(s, t, temperature=1.0), [1.1504],
                             atol=1e-4)
  # By symmetry the reverse KL is the same here.
  np.testing.assert_allclose(losses.reverse_kl(s, t), [1.1504], atol=1e-4)
  # TV = 0.5 * (|0.6652 - 0.0900| * 2) = 0.5752.
  np.testing.assert_allclose(losses.total_variation(s, t), [0.5752],
                             atol=1e-4)
  # DKD, label 0: b_t = (0.6652, 0.3348), b_s = (0.0900, 0.9100):
  # TCKD = 0.6652 ln(e^2) + 0.3348 ln(0.3348 / 0.9100) = 1.3304 - 0.3348
  #      = 0.9957 (0.3348/0.91 = e^-1 because both come from the same logits).
  # Non-target classes 1, 2: q_t = softmax(2, 1) = (0.7311, 0.2689),
  # q_s = softmax(2, 3) = (0.2689, 0.7311): NCKD = 0.7311 - 0.2689 = 0.4621.
  y = jnp.array([0])
  np.testing.assert_allclose(
      losses.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=1.0), [0.9957],
      atol=1e-4)
  np.testing.assert_allclose(
      losses.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=1.0), [0.4621],
      atol=1e-4)
  np.testing.assert_allclose(losses.dkd(s, t, y, temperature=1.0),
                             [0.9957 + 8 * 0.4621], atol=1e-3)
  # JSD(beta=0.5) of disjoint one-hots: each KL to the (0.5, 0.5) mix is ln 2.
  a = jnp.array([[0.0, -jnp.inf]])
  b = jnp.array([[-jnp.inf, 0.0]])
  np.testing.assert_allclose(losses.generalized_jsd(a, b), [np.log(2)],
                             rtol=1e-6)
  # Skew forward KL of disjoint one-hots: 1 * ln(1 / alpha).
  np.testing.assert_allclose(losses.skew_forward_kl(a, b, alpha=0.25),
                             [np.log(4)], rtol=1e-6)
  # Skew reverse KL, alpha=0.5: ln(1 / 0.5).
  np.testing.assert_allclose(losses.skew_reverse_kl(a, b, alpha=0.5),
                             [np.log(2)], rtol=1e-6)
  # NKD with uniform logits, C=3, label 0: target term (1/3) ln 3 = 0.3662;
  # non-target q uniform over 2 classes: 1.5 * ln 2 = 1.0397.
  u = jnp.zeros((1, 3))
  np.testing.assert_allclose(losses.nkd(u, u, y), [0.3662 + 1.0397],
                             atol=1e-4)
  # TAID t=0.5: target softmax(0.5 * (0, 0) + 0.5 * (0, 2 ln 3)) = (1/4, 3/4);
  # KL to (1/2, 1/2) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308.
  np.testing.assert_allclose(
      losses.taid(jnp.zeros((1, 2)), jnp.array([[0.0, 2 * np.log(3.0)]]),
                  t=0.5), [0.1308], atol=1e-4)
  # sparse_kd: teacher keeps classes (2, 0) with equal logits -> (1/2, 1/2);
  # uniform student over 4 classes: 2 * 0.5 * ln(0.5 / 0.25) = ln 2.
  np.testing.assert_allclose(
      losses.sparse_kd(jnp.zeros((1, 4)), jnp.array([[5.0, 5.0]]),
                       jnp.array([[2, 0]])), [np.log(2)], rtol=1e-6)
  # multi_teacher: teachers (reversed, identical) with weights 1/2:
  # 0.5 * 1.1504 + 0.5 * 0 = 0.5752.
  np.testing.assert_allclose(
      losses.multi_teacher_kd(s, jnp.stack([t, s]), temperatures=1.0),
      [0.5752], atol=1e-4)
  # standardize: mean 2, std(ddof=1) 1 -> (-1, 0, 1).
  np.testing.assert_allclose(losses.standardize_logits(s), [[-1.0, 0.0, 1.0]],
                             atol=1e-6)
