"""Tests for kdjax.losses.relational (DIST) against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_pearson(a, b, eps=1e-8):
  # As in the official DIST code: cosine similarity of centred vectors with the
  # eps added to the product of the norms.
  a = a - a.mean()
  b = b - b.mean()
  return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def ref_dist(s, t, beta=1.0, gamma=1.0, temperature=1.0):
  ps = np_softmax(np.reshape(s, (-1, s.shape[-1])) / temperature)
  pt = np_softmax(np.reshape(t, (-1, t.shape[-1])) / temperature)
  inter = 1 - np.mean([np_pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
  intra = 1 - np.mean([np_pearson(ps[:, c], pt[:, c])
                       for c in range(ps.shape[1])])
  return temperature**2 * (beta * inter + gamma * intra)


def test_matches_reference():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
  with jax.enable_x64(True):
    got = losses.dist(jnp.asarray(s), jnp.asarray(t), beta=0.7, gamma=1.3,
                      temperature=2.0)
    assert got.shape == ()
    np.testing.assert_allclose(got, ref_dist(s, t, 0.7, 1.3, 2.0), rtol=1e-10)
  got32 = losses.dist(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, ref_dist(s, t), rtol=1e-4)


def test_sequence_input_and_where_equal_selected_rows():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 7)), rng.normal(size=(2, 4, 7))
  where = np.array([[True, False, True, True], [False, True, True, False]])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where] = np.nan  # unselected rows may hold anything
  t_bad[~where] = np.inf
  with jax.enable_x64(True):
    np.testing.assert_allclose(losses.dist(jnp.asarray(s), jnp.asarray(t)),
                               ref_dist(s, t), rtol=1e-10)
    got = losses.dist(jnp.asarray(s_bad), jnp.asarray(t_bad),
                      where=jnp.asarray(where), temperature=3.0)
    np.testing.assert_allclose(got, ref_dist(s[where], t[where],
                                             temperature=3.0), rtol=1e-10)
    np.testing.assert_allclose(
        got, losses.dist(jnp.asarray(s[where]), jnp.asarray(t[where]),
                         temperature=3.0), rtol=1e-12)
    grads = jax.jit(jax.grad(
        lambda a, b: losses.dist(a, b, where=jnp.asarray(where)),
        argnums=(0, 1)))(jnp.asarray(s_bad), jnp.asarray(t_bad))
    for g in grads:
      assert np.all(np.isfinite(g))
      np.testing.assert_array_equal(np.asarray(g)[~where], 0.0)
    # No row selected: 0, with zero (finite) gradients.
    none = jnp.zeros(where.shape, bool)
    assert float(losses.dist(jnp.asarray(s), jnp.asarray(t), where=none)) == 0
    g = jax.jit(jax.grad(lambda a: losses.dist(a, jnp.asarray(t),
                                               where=none)))(jnp.asarray(s))
    np.testing.assert_array_equal(g, 0.0)


def test_check_grads():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  where = jnp.asarray([True, True, False, True, True])
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda a, b: losses.dist(a, b, beta=2.0, where=where)),
                (jnp.asarray(s), jnp.asarray(t)), order=1, modes=["rev"])


DIST_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(losses.dist, argnums=(0, 1)))


@pytest.mark.parametrize("kind", ["large", "neg_inf", "one_hot", "single_row",
                                  "bf16"])
def test_extreme_inputs_are_finite(kind):
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  if kind == "large":
    s, t = s * 5e3, t * 5e3
  elif kind == "neg_inf":
    s[:, [1, 3]] = -np.inf
    t[:, [1, 3]] = -np.inf
  elif kind == "one_hot":
    t = np.zeros_like(t)
    t[np.arange(4), [0, 2, 2, 5]] = 1e4
  elif kind == "single_row":
    s, t = s[:1], t[:1]
  dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
  s, t = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
  value, grads = DIST_VALUE_AND_GRAD(s, t)
  assert value.dtype == jnp.float32
  assert np.isfinite(float(value))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_hand_checked_values():
  s = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
  # Identical predictions: every correlation is 1 (up to eps).
  np.testing.assert_allclose(losses.dist(s, s), 0.0, atol=1e-6)
  # Swapping the two rows: row 0 of the student, softmax(1, 2, 3) = (a, b, c),
  # meets the teacher's (c, a, b), a cyclic shift. For a centred 3-vector x,
  # <x, shift(x)> = ((sum x)^2 - |x|^2) / 2 = -|x|^2 / 2, so rho = -1/2 and the
  # row term is 1.5. Each column has two points, swapped: rho = -1, term 2.
  np.testing.assert_allclose(losses.dist(s, s[::-1]), 3.5, atol=1e-5)
  np.testing.assert_allclose(losses.dist(s, s[::-1], beta=2.0, gamma=0.0),
                             3.0, atol=1e-5)
