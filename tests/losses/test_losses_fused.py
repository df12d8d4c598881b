"""Tests for kdjax.losses.fused: vocabulary-chunked losses from hidden states.

Each fused loss must equal the unfused loss of `kdjax.losses` on materialised
logits `hidden @ unembedding` (values and gradients w.r.t. the student hidden
states and unembedding), and the closed-form gradients of its docstring in a
float64 numpy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

# name -> (fused, unfused, hyper-parameters); beta/alpha away from the defaults.
CASES = {
    "kd": (losses.fused_kd, losses.kd, {}),
    "forward_kl": (losses.fused_forward_kl, losses.forward_kl, {}),
    "reverse_kl": (losses.fused_reverse_kl, losses.reverse_kl, {}),
    "jsd": (losses.fused_generalized_jsd, losses.generalized_jsd,
            {"beta": 0.3}),
    "jsd_beta0": (losses.fused_generalized_jsd, losses.generalized_jsd,
                  {"beta": 0.0}),
    "skew_forward_kl": (losses.fused_skew_forward_kl, losses.skew_forward_kl,
                        {"alpha": 0.2}),
    "skew_reverse_kl": (losses.fused_skew_reverse_kl, losses.skew_reverse_kl,
                        {"alpha": 0.2}),
    "total_variation": (losses.fused_total_variation, losses.total_variation,
                        {}),
}
# V=11 with vocab chunks of 4 (a shifted, overlapping last block); N=10 tokens
# in chunks of 3 (padded).
CHUNKS = {"vocab_chunk_size": 4, "token_chunk_size": 3}
TEMPERATURE = 1.5


def _inputs(seed=0, shape=(2, 5), dims=(4, 6), vocab=11, scale=2.0):
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (f32(rng.normal(size=shape + (dims[0],))),
          f32(scale * rng.normal(size=(dims[0], vocab))),
          f32(rng.normal(size=shape + (dims[1],))),
          f32(scale * rng.normal(size=(dims[1], vocab))))


def _value_and_grads(loss, hs, ws, ht, wt, weights, **kw):
  """Weighted sum of per-token values, and its gradient w.r.t. (hs, ws)."""
  return jax.value_and_grad(
      lambda a, b: jnp.sum(weights * loss(a, b, ht, wt, **kw)),
      argnums=(0, 1))(hs, ws)


def _materialised(unfused):
  return lambda hs, ws, ht, wt, **kw: unfused(hs @ ws, ht @ wt, **kw)


@pytest.fixture(scope="module")
def all_results():
  """One compile for every divergence, fused and unfused, masked."""
  hs, ws, ht, wt = _inputs()
  where = jnp.asarray(np.random.default_rng(1).random((2, 5)) > 0.3)
  weights = jnp.arange(1.0, 11.0).reshape(2, 5)  # a non-uniform cotangent

  @jax.jit
  def run(hs, ws, ht, wt):
    out = {}
    for name, (fused, unfused, hyper) in CASES.items():
      kw = dict(hyper, temperature=TEMPERATURE, where=where)
      out[name] = (
          _value_and_grads(fused, hs, ws, ht, wt, weights, **kw, **CHUNKS),
          _value_and_grads(_materialised(unfused), hs, ws, ht, wt, weights,
                           **kw))
    return out

  return run(hs, ws, ht, wt), (hs, ws, ht, wt, where)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_unfused_values_and_gradients(all_results, name):
  results, (_, _, _, _, where) = all_results
  (value, grads), (want_value, want_grads) = results[name]
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    scale = np.max(np.abs(want))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  # Masked tokens get exactly zero hidden-state gradient.
  assert np.all(np.asarray(grads[0])[~np.asarray(where)] == 0)


def _numpy_reference(name, hs, ws, ht, wt, weights, temperature, hyper):
  """float64 `sum(weights * values)` and its gradients w.r.t. (hs, ws).

  The gradients use the closed forms of the fused losses' docstrings (not
  autodiff): `d_u` is the gradient w.r.t. the scaled student logits `u = z/T`.
  """
  hs, ws, ht, wt = (np.asarray(a, np.float64) for a in (hs, ws, ht, wt))
  u, w = hs @ ws / temperature, ht @ wt / temperature

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lps, lpt = log_softmax(u), log_softmax(w)
  ps, pt = np.exp(lps), np.exp(lpt)
  kl = lambda a, la, lb: np.sum(a * (la - lb), -1, keepdims=True)
  if name in ("kd", "forward_kl"):
    value, d_u = kl(pt, lpt, lps), ps - pt
    if name == "kd":
      value, d_u = temperature**2 * value, temperature**2 * d_u
  elif name == "reverse_kl":
    value = kl(ps, lps, lpt)
    d_u = ps * (lps - lpt - value)
  elif name == "jsd":
    beta = hyper["beta"]
    m = beta * pt + (1 - beta) * ps
    kl_s = kl(ps, lps, np.log(m))
    value = beta * kl(pt, lpt, np.log(m)) + (1 - beta) * kl_s
    d_u = (1 - beta) * ps * (lps - np.log(m) - kl_s)
  elif name == "skew_forward_kl":
    alpha = hyper["alpha"]
    mix = alpha * pt + (1 - alpha) * ps
    value = kl(pt, lpt, np.log(mix))
    s = np.sum(pt**2 / mix, -1, keepdims=True)
    d_u = ps - pt + alpha * (pt**2 / mix - ps * s)
  elif name == "skew_reverse_kl":
    alpha = hyper["alpha"]
    mix = alpha * ps + (1 - alpha) * pt
    value = kl(ps, lps, np.log(mix))
    s = np.sum(ps**2 / mix, -1, keepdims=True)
    d_u = ps * (lps - np.log(mix) - alpha * ps / mix - value + alpha * s)
  else:
    assert name == "total_variation"
    value = 0.5 * np.sum(np.abs(pt - ps), -1, keepdims=True)
    sign = np.sign(ps - pt)
    d_u = 0.5 * ps * (sign - np.sum(ps * sign, -1, keepdims=True))
  d_z = d_u * weights[..., None] / temperature
  d_unembed = hs.reshape(-1, hs.shape[-1]).T @ d_z.reshape(-1, d_z.shape[-1])
  return np.sum(weights * value[..., 0]), (d_z @ ws.T, d_unembed)


@pytest.mark.parametrize("name", [n for n in CASES if n != "jsd_beta0"])
def test_float64_numpy_reference_closed_forms(all_results, name):
  """Values and the docstrings' closed-form gradients, in float64 numpy."""
  results, (hs, ws, ht, wt, where) = all_results
  (value, grads), _ = results[name]
  weights = np.arange(1.0, 11.0).reshape(2, 5) * np.asarray(where)
  want_value, want_grads = _numpy_reference(
      name, hs, ws, ht, wt, weights, TEMPERATURE, CASES[name][2])
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_mask_equals_slicing_and_blocks_nan():
  hs, ws, ht, wt = _inputs(seed=4, shape=(7,))
  where = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  # NaN and inf in masked rows must not reach the values or gradients.
  hs = hs.at[1].set(jnp.nan).at[4].set(jnp.inf)
  ht = ht.at[5].set(jnp.nan)
  loss = jax.jit(jax.value_and_grad(
      lambda a, b, h, m: jnp.sum(losses.fused_generalized_jsd(
          a, b, h, wt, where=m, vocab_chunk_size=4, token_chunk_size=2)),
      argnums=(0, 1)))
  value, (d_hidden, d_unembed) = loss(hs, ws, ht, jnp.asarray(where))
  kept = np.flatnonzero(where)
  want_value, (want_hidden, want_unembed) = jax.value_and_grad(
      lambda a, b: jnp.sum(losses.generalized_jsd(a @ b, ht[kept] @ wt)),
      argnums=(0, 1))(hs[kept], ws)
  assert np.isfinite(value) and np.isfinite(d_unembed).all()
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in ((d_unembed, want_unembed), (d_hidden[kept], want_hidden)):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
  assert np.all(np.asarray(d_hidden)[~where] == 0)


@pytest.mark.parametrize("name", [
    "jsd", pytest.param("skew_reverse_kl", marks=pytest.mark.slow),
    # Known defect (issue 12's note): for saturated softmaxes the fused reverse KL's gradient
    # w.r.t. the hidden states is float32 cancellation noise of order 1 (1.52 here) where the
    # true gradient is ~1e-18 and the unfused loss gives ~1e-10; values agree. strict: the day
    # it is fixed this test fails until the mark goes.
    pytest.param("reverse_kl", marks=(pytest.mark.slow, pytest.mark.xfail(
        strict=True, reason="fused reverse_kl: saturated-softmax gradient noise (known)")))])
def test_extreme_logits_finite_and_match(name):
  """|logits| ~ 1e4: saturated softmaxes stay finite; offsets are harmless."""
  fused, unfused, hyper = CASES[name]
  run = jax.jit(lambda *a: (
      _value_and_grads(fused, *a, 1.0, vocab_chunk_size=4, **hyper),
      _value_and_grads(_materialised(unfused), *a, 1.0, **hyper)))
  # Saturated (near one-hot) distributions: the true gradient is ~1e-18, so
  # both are float32 rounding noise, of size eps * |W| at most.
  hs, ws, ht, wt = _inputs(seed=5, shape=(4,), scale=3000.0)
  got, want = run(hs, ws, ht, wt)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a in jax.tree.leaves(got):
    assert np.isfinite(a).all()
  assert np.abs(got[1][0]).max() < 1e-6 * np.abs(ws).max() * ws.shape[1]
  # A shared offset of 1e4 on every logit (hidden unit 0 is 1, its unembedding
  # row 1e4) must not change values or gradients beyond rounding.
  hs, ws, ht, wt = _inputs(seed=6, shape=(4,))
  hs, ht = hs.at[:, 0].set(1.0), ht.at[:, 0].set(1.0)
  ws, wt = ws.at[0].set(1e4), wt.at[0].set(-1e4)
  got, want = run(hs, ws, ht, wt)
  # The gradient w.r.t. the offset unit is 0 by shift invariance; in float32
  # it is 1e4 * rounding noise, for both.
  assert np.abs(got[1][0][:, 0]).max() < 1e-2
  got = (got[0], (got[1][0][:, 1:], got[1][1]))
  want = (want[0], (want[1][0][:, 1:], want[1][1]))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.isfinite(a).all()
    # Logits near 1e4 are rounded to ~5e-4 in float32, so log-probabilities
    # (and both gradients) only agree to about that.
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_bfloat16_inputs_close_to_float32():
  hs, ws, ht, wt = _inputs(seed=6, shape=(2, 3), scale=0.5)
  bf16 = [a.astype(jnp.bfloat16) for a in (hs, ws, ht, wt)]
  fn = jax.jit(jax.value_and_grad(
      lambda a, b, c, d: jnp.sum(losses.fused_kd(a, b, c, d,
                                                 vocab_chunk_size=4)),
      argnums=(0, 1)))
  value, grads = fn(*bf16)
  # Reference: the same bf16-rounded numbers, unfused in float32.
  hs, ws, ht, wt = [a.astype(jnp.float32) for a in bf16]
  want_value, want_grads = jax.value_and_grad(
      lambda a, b: jnp.sum(losses.kd(a @ b, ht @ wt)), argnums=(0, 1))(hs, ws)
  assert value.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.slow
def test_traced_beta_and_no_teacher_gradient():
  hs, ws, ht, wt = _inputs(seed=7, shape=(5,))
  fn = jax.jit(lambda b, beta: losses.fused_generalized_jsd(
      hs, b, ht, wt, beta=beta, vocab_chunk_size=4))
  for beta in (0.0, 0.4, 1.0):
    np.testing.assert_allclose(
        fn(ws, beta), losses.generalized_jsd(hs @ ws, ht @ wt, beta=beta),
        rtol=1e-5, atol=1e-7)
  teacher_grads = jax.jit(jax.grad(
      lambda c, d: jnp.sum(losses.fused_forward_kl(hs, ws, c, d)),
      argnums=(0, 1)))(ht, wt)
  assert all(np.all(np.asarray(g) == 0) for g in teacher_grads)


def test_bad_inputs_fail_with_clear_messages():
  hs, ws, ht, wt = _inputs()
  with pytest.raises(ValueError, match=r"^fused_kd: student_unembedding must "
                     r"have shape \[D, V\] with D = .* 4"):
    losses.fused_kd(hs, ws.T, ht, wt)
  with pytest.raises(ValueError, match="vocabulary sizes differ"):
    losses.fused_kd(hs, ws, ht, wt[:, :5])
  with pytest.raises(ValueError, match="teacher_hidden shape"):
    losses.fused_kd(hs, ws, ht[:1], wt)
  with pytest.raises(ValueError, match="vocab_chunk_size must be a positive"):
    losses.fused_kd(hs, ws, ht, wt, vocab_chunk_size=0)
  with pytest.raises(ValueError, match=r"where must have shape \(2, 5\)"):
    losses.fused_kd(hs, ws, ht, wt, where=jnp.ones((10,), bool))
  with pytest.raises(ValueError, match="^fused_generalized_jsd: beta"):
    losses.fused_generalized_jsd(hs, ws, ht, wt, beta=1.5)
