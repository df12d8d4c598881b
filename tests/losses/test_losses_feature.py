"""Feature and relational feature losses against float64 numpy references written from the
papers' official code (RepDistiller's `distiller_zoo`), plus masks, gradients, extremes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses

# --- float64 numpy references, loop-based where the code is vectorised -----------------------


def ref_fitnet(s, t):
  return np.mean(((s - t) ** 2).reshape(len(s), -1), axis=1)


def ref_normalize(v, eps=1e-12):  # torch.nn.functional.normalize
  return v / max(np.linalg.norm(v), eps)


def ref_attention_transfer(s, t, p=2):
  def at(f):
    return np.stack([ref_normalize((f[i] ** p).mean(-1).reshape(-1)) for i in range(len(f))])
  return np.mean((at(s) - at(t)) ** 2, axis=1)


def ref_similarity_preserving(s, t):
  b = len(s)
  fs, ft = s.reshape(b, -1), t.reshape(b, -1)
  gs = np.stack([ref_normalize(row) for row in fs @ fs.T])
  gt = np.stack([ref_normalize(row) for row in ft @ ft.T])
  return np.sum((gs - gt) ** 2) / b**2


def huber(x):
  return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def ref_rkd_distance(s, t):
  b = len(s)

  def normalised(x):
    x = x.reshape(b, -1)
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
    return d / (d.sum() / (b * (b - 1)))

  return np.mean(huber(normalised(s) - normalised(t)))


def ref_rkd_angle(s, t):
  b = len(s)

  def angles(x):
    x = x.reshape(b, -1)
    a = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          a[i, j, k] = ref_normalize(x[j] - x[i]) @ ref_normalize(x[k] - x[i])
    return a

  return np.mean(huber(angles(s) - angles(t)))


def ref_pkt(s, t, eps=1e-7):
  b = len(s)

  def q(x):
    x = x.reshape(b, -1)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    c = (x @ x.T + 1) / 2
    return c / c.sum(axis=1, keepdims=True)

  qs, qt = q(s), q(t)
  return np.mean(qt * np.log((qt + eps) / (qs + eps)))


PER_EXAMPLE = {
    "fitnet": (losses.fitnet, ref_fitnet, (6, 4, 4, 3), (6, 4, 4, 3)),
    "attention_transfer": (losses.attention_transfer, ref_attention_transfer, (6, 4, 4, 3),
                           (6, 4, 4, 5)),
}
RELATIONAL = {
    "similarity_preserving": (losses.similarity_preserving, ref_similarity_preserving,
                              (6, 2, 2, 3), (6, 2, 2, 5)),
    "rkd_distance": (losses.rkd_distance, ref_rkd_distance, (6, 7), (6, 9)),
    "rkd_angle": (losses.rkd_angle, ref_rkd_angle, (6, 7), (6, 9)),
    "pkt": (losses.pkt, ref_pkt, (6, 7), (6, 9)),
}
ALL = {**PER_EXAMPLE, **RELATIONAL}


def _features(seed, shape_s, shape_t):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape_s), rng.normal(size=shape_t)


@pytest.mark.parametrize("name", ALL)
def test_matches_the_float64_reference(name):
  loss, reference, shape_s, shape_t = ALL[name]
  s, t = _features(0, shape_s, shape_t)
  with jax.enable_x64(True):
    got = loss(jnp.asarray(s), jnp.asarray(t))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, reference(s, t), rtol=1e-9, atol=1e-12)
  got32 = loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, reference(s, t), rtol=2e-4, atol=1e-6)
  expected_shape = (shape_s[0],) if name in PER_EXAMPLE else ()
  assert got32.shape == expected_shape


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs_compute_in_float32(name):
  loss, reference, shape_s, shape_t = ALL[name]
  s, t = _features(1, shape_s, shape_t)
  got = loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  s16 = np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64)
  t16 = np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(got, reference(s16, t16), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_where_equals_the_selected_rows_alone_whatever_the_others_hold(name):
  loss, _, shape_s, shape_t = ALL[name]
  s, t = _features(2, shape_s, shape_t)
  where = np.array([True, False, True, True, False, True])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where], t_bad[~where] = np.nan, np.inf
  with jax.enable_x64(True):
    masked = loss(jnp.asarray(s_bad), jnp.asarray(t_bad), where=jnp.asarray(where))
    alone = loss(jnp.asarray(s[where]), jnp.asarray(t[where]))
    if name in PER_EXAMPLE:
      np.testing.assert_allclose(masked[where], alone, rtol=1e-12)
      assert np.all(np.asarray(masked)[~where] == 0)
    else:
      np.testing.assert_allclose(masked, alone, rtol=1e-12)
    grads = jax.grad(lambda x: jnp.sum(loss(x, jnp.asarray(t_bad), where=jnp.asarray(where))))(
        jnp.asarray(s_bad))
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~where] == 0)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_finite_differences(name):
  loss, _, shape_s, shape_t = ALL[name]
  s, t = _features(3, shape_s, shape_t)
  with jax.enable_x64(True):
    check_grads(lambda x: jnp.sum(loss(x, jnp.asarray(t))), (jnp.asarray(s),), order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_duplicate_zero_and_huge_rows_stay_finite(name):
  loss, _, shape_s, shape_t = ALL[name]
  s, t = _features(4, shape_s, shape_t)
  s[1], t[1] = s[0], t[0]  # Duplicates: zero distances off the diagonal.
  s[2], t[3] = 0.0, 0.0  # All-zero rows (dead ReLU features).
  s[4] *= 1e4
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  value, grads = jax.value_and_grad(lambda x: jnp.sum(loss(x, t)))(s)
  assert np.isfinite(value) and np.all(np.isfinite(grads)), (value, grads)


def test_hand_checked_values():
  # fitnet: per-example mean of squared differences.
  s = jnp.zeros((2, 3))
  t = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
  np.testing.assert_allclose(losses.fitnet(s, t), [1.0, 3.0])
  # AT: maps [1, 0] vs [0, 1] (one channel, p=1 so that the map is the feature itself):
  # a = e1 and e2, mean squared difference (1 + 1) / 2 = 1.
  a = jnp.array([[[[1.0]], [[0.0]]]])  # [1, 2, 1, 1]
  b = jnp.array([[[[0.0]], [[1.0]]]])
  np.testing.assert_allclose(losses.attention_transfer(a, b, p=1), [1.0])
  # SP: orthogonal rows give G = I; identical rows give G = [[1, 1], [1, 1]] / sqrt(2):
  # squared difference (1 - 1/sqrt2)^2 * 2 + (1/sqrt2)^2 * 2 = 4 - 2 sqrt2, over B^2 = 4.
  eye = jnp.eye(2)
  same = jnp.ones((2, 2))
  np.testing.assert_allclose(losses.similarity_preserving(eye, same), (4 - 2 * np.sqrt(2)) / 4,
                             rtol=1e-6)
  # RKD distance: 3 points; student on a line at 0, 1, 2 (distances 1, 2, 1; mean 4/3);
  # teacher an equilateral triangle (all distances equal their mean: 1).
  line = jnp.array([[0.0], [1.0], [2.0]])
  triangle = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
  ds = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]]) / (4 / 3)
  dt = (1 - np.eye(3))
  np.testing.assert_allclose(losses.rkd_distance(line, triangle), np.mean(huber(ds - dt)),
                             rtol=1e-6)


def test_mismatched_shapes_name_both_and_the_fix():
  with pytest.raises(ValueError, match=r"fitnet: student_features shape \(2, 4, 4, 8\) and "
                                       r"teacher_features shape \(2, 4, 4, 16\) differ; map the "
                                       r"student's features .* connector"):
    losses.fitnet(jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 4, 4, 16)))
  with pytest.raises(ValueError, match=r"attention_transfer: .*different spatial sizes \(8, 8\) "
                                       r"vs \(4, 4\).*pool"):
    losses.attention_transfer(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"rkd_angle: .*different batch sizes"):
    losses.rkd_angle(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"pkt: student_features must be at least \[B, D\]"):
    losses.pkt(jnp.zeros((3,)), jnp.zeros((3,)))
  with pytest.raises(TypeError, match=r"similarity_preserving: teacher_features must have a "
                                      r"floating dtype"):
    losses.similarity_preserving(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"rkd_distance: where must have shape \(2,\)"):
    losses.rkd_distance(jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones((3,), bool))


def test_jit_and_vmap_free_of_python_side_effects():
  s, t = _features(5, (4, 6), (4, 5))
  for name in RELATIONAL:
    loss = RELATIONAL[name][0]
    np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)
