"""MiniLM's self-attention relation losses against a float64 numpy reference written from the
papers (loops over examples, heads and query tokens), plus example and token masks (equal to
slicing / deleting), gradients, extremes and error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.losses.attention import minilm_relation, minilm_v1, minilm_v2

# Jitted once per shape: eager calls compile every primitive separately (seconds per test).
relation = jax.jit(minilm_relation, static_argnames=("num_relation_heads",))

# --- float64 numpy reference ---------------------------------------------------------------


def ref_heads(x, num_relation_heads=None):
  """One example's `[h, T, d]` (or `[T, D]`) as a list of `[T, d']` relation-head matrices."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[None]
  heads = [x[h] for h in range(x.shape[0])]
  if num_relation_heads is None:
    return heads
  merged = np.concatenate(heads, axis=-1)  # [T, h*d]: the heads side by side, as in MiniLMv2
  return np.split(merged, num_relation_heads, axis=-1)


def ref_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def ref_relation(sa, ta, sb=None, tb=None, num_relation_heads=None, token_where=None):
  sb = sa if sb is None else sb
  tb = ta if tb is None else tb
  values = []
  for i in range(len(sa)):
    tokens = (np.arange(sa.shape[-2]) if token_where is None
              else np.flatnonzero(token_where[i]))
    if len(tokens) == 0:
      values.append(0.0)
      continue
    total, count = 0.0, 0
    heads = zip(*(ref_heads(x[i], num_relation_heads) for x in (sa, sb, ta, tb)))
    for s_a, s_b, t_a, t_b in heads:
      s_a, s_b, t_a, t_b = (m[tokens] for m in (s_a, s_b, t_a, t_b))
      p_s = ref_softmax(s_a @ s_b.T / np.sqrt(s_a.shape[-1]))
      p_t = ref_softmax(t_a @ t_b.T / np.sqrt(t_a.shape[-1]))
      for q in range(len(tokens)):
        total += np.sum(p_t[q] * (np.log(p_t[q]) - np.log(p_s[q])))
        count += 1
    values.append(total / count)
  return np.array(values)


def _qkv(seed, student_shape, teacher_shape):
  """Six arrays: student q, teacher q, student k, teacher k, student v, teacher v."""
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape) for _ in range(3) for shape in (student_shape, teacher_shape)]


# Test shapes are shared so that each jitted function compiles once (compiles dominate).
S_SHAPE, T_SHAPE = (3, 2, 5, 4), (3, 2, 5, 6)
CASES = {
    # name: (student shape, teacher shape, num_relation_heads)
    "same_heads": (S_SHAPE, T_SHAPE, None),
    "relation_heads": ((3, 2, 5, 4), (3, 4, 5, 4), 4),
    "one_head_split": ((3, 5, 6), (3, 2, 5, 6), 3),
}


@jax.jit
def _relations_of_each_case(arrays):
  return {case: minilm_relation(*arrays[case], num_relation_heads=CASES[case][2])
          for case in CASES}


def test_matches_the_float64_reference():
  arrays = {case: _qkv(0, s_shape, t_shape)[:4] for case, (s_shape, t_shape, _) in CASES.items()}
  with jax.enable_x64(True):
    got = _relations_of_each_case(jax.tree.map(jnp.asarray, arrays))
  for case, (sq, tq, sk, tk) in arrays.items():
    expected = ref_relation(sq, tq, sk, tk, CASES[case][2])
    assert got[case].dtype == jnp.float64 and got[case].shape == (3,)
    np.testing.assert_allclose(got[case], expected, rtol=1e-10, err_msg=case)
    assert np.all(expected > 1e-3)  # Something that could be wrong.
  # float32 inputs: float32 values, close to the reference.
  sq, tq, sk, tk = arrays["same_heads"]
  got32 = relation(*(jnp.asarray(x, jnp.float32) for x in (sq, tq, sk, tk)))
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, ref_relation(sq, tq, sk, tk), rtol=1e-4, atol=1e-6)


def test_v1_and_v2_are_the_documented_sums_of_relations():
  sq, tq, sk, tk, sv, tv = _qkv(1, S_SHAPE, T_SHAPE)
  with jax.enable_x64(True):
    args = [jnp.asarray(x) for x in (sq, tq, sk, tk, sv, tv)]
    got_v1, got_v2 = jax.jit(lambda a: (minilm_v1(*a), minilm_v2(*a, num_relation_heads=4)))(
        args)
  np.testing.assert_allclose(got_v1, ref_relation(sq, tq, sk, tk) + ref_relation(sv, tv),
                             rtol=1e-10)
  np.testing.assert_allclose(
      got_v2, ref_relation(sq, tq, None, None, 4) + ref_relation(sk, tk, None, None, 4)
      + ref_relation(sv, tv, None, None, 4), rtol=1e-10)


def test_hand_checked_values():
  # One head, two tokens of width 1; student scores all 0 (uniform rows); the teacher's first
  # query scores its keys ln 3 and 0: [3/4, 1/4]; its second is uniform.
  s = jnp.zeros((1, 1, 2, 1))
  t = jnp.array([[[[np.sqrt(np.log(3.0))], [0.0]]]])
  expected = (0.75 * np.log(1.5) + 0.25 * np.log(0.5)) / 2
  np.testing.assert_allclose(relation(s, t, s, t), [expected], rtol=1e-6)
  # The KL is the teacher's || the student's: swapped, KL(uniform || [3/4, 1/4]) / 2.
  np.testing.assert_allclose(relation(t, s, t, s),
                             [(0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) / 2],
                             rtol=1e-6)
  sq, tq, sk, tk = (jnp.asarray(x, jnp.float32) for x in _qkv(2, S_SHAPE, T_SHAPE)[:4])
  # As many relation heads as heads: the heads themselves, the per-head loss.
  np.testing.assert_allclose(relation(sq, tq, sk, tk, num_relation_heads=2),
                             relation(sq, tq, sk, tk), rtol=1e-6)
  # Scaling q by c and k by 1/c leaves attention unchanged: 0 against the unscaled teacher.
  np.testing.assert_allclose(relation(2 * sq, sq, sk / 2, sk), np.zeros(3), atol=1e-6)


HEADS = (None, 2)  # Per head, and two relation heads.
M_SHAPE_S, M_SHAPE_T = (4, 2, 6, 4), (4, 2, 6, 3)  # The masked tests' shapes.


@jax.jit
def _masked_values_and_grads(args, where, token_where):
  """Per heads setting: the loss with masks and its gradient in the student's q and k."""
  out = []
  for heads in HEADS:
    loss = lambda a, b: minilm_relation(a, args[1], b, args[3], num_relation_heads=heads,
                                        where=where, token_where=token_where)
    out.append((loss(args[0], args[2]),
                jax.grad(lambda a, b: jnp.sum(loss(a, b)), argnums=(0, 1))(args[0], args[2])))
  return out


def test_where_equals_the_selected_examples_alone_whatever_the_others_hold():
  sq, tq, sk, tk = _qkv(4, M_SHAPE_S, M_SHAPE_T)[:4]
  where = np.array([True, False, True, False])
  bad = [x.copy() for x in (sq, tq, sk, tk)]
  for x, value in zip(bad, (np.nan, np.inf, -np.inf, np.nan)):
    x[~where] = value
  with jax.enable_x64(True):
    got = _masked_values_and_grads([jnp.asarray(x) for x in bad], jnp.asarray(where),
                                   jnp.ones(sq.shape[::2], bool))
  for heads, (masked, grads) in zip(HEADS, got):
    alone = ref_relation(*(x[where] for x in (sq, tq, sk, tk)), num_relation_heads=heads)
    np.testing.assert_allclose(np.asarray(masked)[where], alone, rtol=1e-12)
    assert np.all(np.asarray(masked)[~where] == 0)
    for g in grads:
      assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~where] == 0)
      assert np.any(np.asarray(g)[where] != 0)


def test_token_where_equals_deleting_the_masked_tokens():
  sq, tq, sk, tk = _qkv(5, M_SHAPE_S, M_SHAPE_T)[:4]
  token_where = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0],
                          [0, 0, 0, 1, 0, 0]], bool)
  kept = token_where[0]
  bad = [x.copy() for x in (sq, tq, sk, tk)]
  for x in bad:
    x[0][:, ~kept] = np.nan  # Garbage in the padding of example 0 ...
    x[2] = np.inf  # ... and everywhere in example 2, which has no token.
  with jax.enable_x64(True):
    got = _masked_values_and_grads([jnp.asarray(x) for x in bad], jnp.ones(4, bool),
                                   jnp.asarray(token_where))
  for heads, (values, grads) in zip(HEADS, got):
    np.testing.assert_allclose(values, ref_relation(sq, tq, sk, tk, heads, token_where),
                               rtol=1e-12)
    # Deleting the tokens by hand gives the same value.
    deleted = ref_relation(*(x[:1, :, kept] for x in (sq, tq, sk, tk)), heads)
    np.testing.assert_allclose(values[0], deleted[0], rtol=1e-12)
    # No token, or a single one (its relation to itself is 1 for both models): 0.
    assert float(values[2]) == 0.0 and float(values[3]) == 0.0 and float(values[0]) > 0
    for g in grads:
      g = np.asarray(g)
      assert np.all(np.isfinite(g)) and np.all(g[0][:, ~kept] == 0) and np.all(g[2] == 0)
      assert np.any(g[0][:, kept] != 0)


def test_gradients_match_finite_differences():
  sq, tq, sk, tk = _qkv(6, (2, 2, 4, 3), (2, 2, 4, 5))[:4]
  with jax.enable_x64(True):
    tq, tk = jnp.asarray(tq), jnp.asarray(tk)
    loss = jax.jit(lambda a, b: sum(jnp.sum(minilm_relation(a, tq, b, tk, num_relation_heads=h))
                                    for h in HEADS))
    check_grads(loss, (jnp.asarray(sq), jnp.asarray(sk)), order=1, modes=["rev"], atol=1e-6,
                rtol=1e-6)


@jax.jit
def _values_and_grads(args):
  """Attention (per head) plus Q-Q relations (two relation heads): both code paths."""
  sq, tq, sk, tk = args
  loss = lambda q, k: jnp.sum(minilm_relation(q, tq, k, tk) +
                              minilm_relation(q, tq, num_relation_heads=2))
  return jax.value_and_grad(loss, argnums=(0, 1))(sq, sk)


def test_duplicate_zero_huge_and_overflowing_inputs_stay_finite():
  sq, tq, sk, tk = _qkv(7, (5,) + S_SHAPE[1:], (5,) + T_SHAPE[1:])[:4]
  sq[0, :, 1], sk[0, :, 1] = sq[0, :, 0], sk[0, :, 0]  # Duplicate tokens.
  sq[1], tk[1] = 0.0, 0.0  # All-zero rows: uniform relations.
  sq[2] *= 1e4  # Saturated (one-hot) relations.
  # Products overflow float32 (max 3.4e38), with both signs: +inf - inf would be NaN.
  sq[3], sk[3], tq[3], tk[3] = sq[3] * 1e25, sk[3] * 1e25, tq[3] * 1e30, tk[3] * 1e30
  sq[4], tq[4] = sq[4] * 1e-30, tq[4] * 1e-38  # Tiny: uniform relations.
  value, grads = _values_and_grads([jnp.asarray(x, jnp.float32) for x in (sq, tq, sk, tk)])
  assert np.isfinite(value), value
  assert all(np.all(np.isfinite(g)) for g in grads)
  # bf16 inputs are computed in float32.
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in _qkv(0, S_SHAPE, T_SHAPE)[:4]]
  got = relation(*bf16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_relation(*(np.asarray(x, np.float64) for x in bf16)),
                             rtol=1e-4)


def test_mismatched_shapes_name_both_and_the_fix():
  z = np.zeros
  with pytest.raises(ValueError, match=r"minilm_relation: student_a shape \(2, 3, 5, 4\) and "
                                       r"teacher_a shape \(2, 6, 5, 4\) have different head "
                                       r"counts 3 and 6; pass num_relation_heads"):
    minilm_relation(z((2, 3, 5, 4)), z((2, 6, 5, 4)))
  with pytest.raises(ValueError, match=r"minilm_v1: student_query shape \(2, 3, 5, 4\) and "
                                       r"teacher_query shape \(2, 3, 7, 4\) must have the same "
                                       r"batch size and token count"):
    minilm_v1(z((2, 3, 5, 4)), z((2, 3, 7, 4)), z((2, 3, 5, 4)), z((2, 3, 7, 4)),
              z((2, 3, 5, 4)), z((2, 3, 7, 4)))
  with pytest.raises(ValueError, match=r"minilm_v2: num_relation_heads=5 must divide the width "
                                       r"heads \* head_dim = 12 of student_query \(shape "
                                       r"\(2, 3, 5, 4\)\)"):
    minilm_v2(*[z((2, 3, 5, 4)), z((2, 5, 5, 4))] * 3, num_relation_heads=5)
  with pytest.raises(ValueError, match=r"minilm_relation: student_a shape \(2, 3, 5, 4\) and "
                                       r"student_b shape \(2, 3, 5, 2\) must be equal"):
    minilm_relation(z((2, 3, 5, 4)), z((2, 3, 5, 4)), z((2, 3, 5, 2)))
  with pytest.raises(ValueError, match=r"minilm_relation: student_a must be \[B, heads, T, "
                                       r"head_dim\] \(or \[B, T, D\] for one head\), got shape "
                                       r"\(2, 5\)"):
    minilm_relation(z((2, 5)), z((2, 5)))
  with pytest.raises(ValueError, match=r"minilm_relation: token_where must have shape \(2, 5\) "
                                       r"\(\[B, T\], one per token\), got shape \(2,\)"):
    minilm_relation(z((2, 5, 4)), z((2, 5, 4)), token_where=np.ones(2, bool))
  with pytest.raises(ValueError, match=r"minilm_relation: where must have shape \(2,\) "
                                       r"\(\[B\], one per example\)"):
    minilm_relation(z((2, 5, 4)), z((2, 5, 4)), where=np.ones((2, 5), bool))
  with pytest.raises(ValueError, match=r"num_relation_heads must be None or a positive integer, "
                                       r"got 0"):
    minilm_relation(z((2, 5, 4)), z((2, 5, 4)), num_relation_heads=0)
  with pytest.raises(TypeError, match=r"minilm_relation: teacher_a must have a floating dtype"):
    minilm_relation(z((2, 5, 4)), z((2, 5, 4), np.int32))
