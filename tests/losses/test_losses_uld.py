"""Universal Logit Distillation (kdjax.losses.universal_logit) against a numpy float64
reference written from the paper and the official code's alignment rule."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses
from kdjax.losses import universal_logit


def _softmax64(z, temperature):
  z = np.asarray(z, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _reference_uld(student, teacher, student_where, teacher_where, ts=1.0, tt=1.0):
  """Loops as in llm-recipes' ULDLoss: each row's completion tokens moved to the front,
  truncated to the shorter completion, sorted probabilities, zero padding, L1."""
  out = np.zeros(student.shape[:2])
  width = max(student.shape[-1], teacher.shape[-1])
  for b in range(student.shape[0]):
    s_pos = np.flatnonzero(student_where[b])
    t_pos = np.flatnonzero(teacher_where[b])
    for k in range(min(len(s_pos), len(t_pos))):
      p = np.sort(_softmax64(student[b, s_pos[k]], ts))[::-1]
      q = np.sort(_softmax64(teacher[b, t_pos[k]], tt))[::-1]
      p = np.pad(p, (0, width - p.size))
      q = np.pad(q, (0, width - q.size))
      out[b, s_pos[k]] = np.abs(p - q).sum()
  return out


def _case(seed=0, b=3, ts=7, tt=9, vs=5, vt=8):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(b, ts, vs)).astype(np.float32) * 2
  teacher = rng.normal(size=(b, tt, vt)).astype(np.float32) * 2
  student_where = rng.random((b, ts)) < 0.6
  teacher_where = rng.random((b, tt)) < 0.6
  student_where[0] = False  # a row without completion tokens
  return student, teacher, student_where, teacher_where


def test_docstring_examples():
  result = doctest.testmod(universal_logit, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("vocab", [(5, 8), (8, 5), (6, 6)])
def test_uld_matches_float64_reference(vocab):
  student, teacher, sw, tw = _case(vs=vocab[0], vt=vocab[1])
  got = losses.uld(student, teacher, student_where=sw, teacher_where=tw,
                   student_temperature=1.5, teacher_temperature=2.0)
  want = _reference_uld(student, teacher, sw, tw, 1.5, 2.0)
  assert got.shape == student.shape[:2]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.count_nonzero(want) > 3  # the case pairs some tokens


def test_hand_value():
  # sorted [0.7, 0.2, 0.1, 0, 0] against [0.4, 0.3, 0.1, 0.1, 0.1]: 0.3 + 0.1 + 0 + 0.1 + 0.1.
  s = jnp.log(jnp.array([0.1, 0.7, 0.2]))
  t = jnp.log(jnp.array([0.1, 0.3, 0.1, 0.4, 0.1]))
  assert float(losses.sorted_probability_distance(s, t)) == pytest.approx(0.6, abs=1e-6)
  # A permutation of the same distribution is at distance 0.
  assert float(losses.sorted_probability_distance(s, s[::-1])) == pytest.approx(0, abs=1e-7)


def test_same_tokenizer_pairs_each_token_with_itself():
  student, teacher, sw, _ = _case(tt=7)
  index, aligned = losses.align_completions(sw, sw)
  np.testing.assert_array_equal(np.asarray(aligned), sw)
  positions = np.broadcast_to(np.arange(sw.shape[1]), sw.shape)
  np.testing.assert_array_equal(np.asarray(index)[sw], positions[sw])


def test_mask_equals_slicing():
  """Padding tokens after each completion (any values) do not change the loss."""
  student, teacher, sw, tw = _case()
  pad_s = np.concatenate([student, np.full((3, 4, student.shape[-1]), np.nan, np.float32)], 1)
  pad_t = np.concatenate([teacher, np.full((3, 2, teacher.shape[-1]), np.inf, np.float32)], 1)
  sw_pad = np.concatenate([sw, np.zeros((3, 4), bool)], 1)
  tw_pad = np.concatenate([tw, np.zeros((3, 2), bool)], 1)
  plain = losses.uld(student, teacher, student_where=sw, teacher_where=tw)
  padded = losses.uld(pad_s, pad_t, student_where=sw_pad, teacher_where=tw_pad)
  np.testing.assert_array_equal(np.asarray(padded)[:, :student.shape[1]], np.asarray(plain))
  assert not np.asarray(padded)[:, student.shape[1]:].any()

  grad = jax.grad(lambda s: losses.uld(s, pad_t, student_where=sw_pad,
                                       teacher_where=tw_pad).sum())(jnp.asarray(pad_s))
  assert np.isfinite(np.asarray(grad)).all()
  assert not np.asarray(grad)[~sw_pad].any()


def test_gradient_matches_finite_differences():
  student, teacher, sw, tw = _case(seed=1, b=2, ts=4, tt=5, vs=4, vt=6)
  t = jnp.asarray(teacher)
  f = lambda s: losses.uld(s, t, student_where=sw, teacher_where=tw).sum()
  with jax.enable_x64(True):
    check_grads(f, (jnp.asarray(student, jnp.float64),), order=1, modes=("rev",), eps=1e-4,
                atol=1e-3, rtol=1e-3)


def test_extreme_logits_stay_finite():
  s = jnp.array([[[1e9, -1e9, 0.0], [-1e30, 1e30, 3.0]]], jnp.float32)
  t = jnp.array([[[-1e9, 1e9], [0.0, -jnp.inf]]], jnp.float32)
  where = jnp.array([[True, True]])
  value, grad = jax.value_and_grad(
      lambda s: losses.uld(s, t, student_where=where, teacher_where=where).sum())(s)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  # Both rows are one-hot against one-hot: distance 0.
  assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_bfloat16_inputs_compute_in_float32():
  student, teacher, sw, tw = _case()
  got = losses.uld(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16),
                   student_where=sw, teacher_where=tw)
  assert got.dtype == jnp.float32


def test_shape_errors_name_the_arguments():
  with pytest.raises(ValueError, match="sorted_probability_distance: student_logits"):
    losses.sorted_probability_distance(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="uld: where must have shape"):
    losses.uld(jnp.zeros((1, 2, 3)), jnp.zeros((1, 4, 5)), student_where=jnp.ones((1, 3)),
               teacher_where=jnp.ones((1, 4)))
