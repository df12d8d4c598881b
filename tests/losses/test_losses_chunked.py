"""Tests for kdjax.losses.chunked: same values and gradients as unchunked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses


def _inputs(shape=(2, 5, 9), seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32),
          jnp.asarray(rng.normal(size=shape) * 2, jnp.float32))


@pytest.mark.parametrize("chunk_size", [3, 5, 64])  # padded, exact, one chunk
def test_chunked_kd_and_forward_kl_match(chunk_size):
  s, t = _inputs()
  where = jnp.asarray(np.random.default_rng(1).random((2, 5)) > 0.3)
  for chunked_fn, fn, kw in (
      (losses.chunked_kd, losses.kd, {"temperature": 2.0}),
      (losses.chunked_forward_kl, losses.forward_kl, {})):
    for mask in (None, where):

      def value_and_grads(a, b, f, **k):
        return jax.value_and_grad(
            lambda a, b: jnp.sum(f(a, b, where=mask, **k)), argnums=(0, 1))(
                a, b)

      got = chunked_fn(s, t, where=mask, chunk_size=chunk_size, **kw)
      want = fn(s, t, where=mask, **kw)
      assert got.shape == want.shape == (2, 5)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
      (v_got, g_got) = jax.jit(lambda a, b: value_and_grads(
          a, b, chunked_fn, chunk_size=chunk_size, **kw))(s, t)
      (v_want, g_want) = jax.jit(lambda a, b: value_and_grads(
          a, b, fn, **kw))(s, t)
      np.testing.assert_allclose(v_got, v_want, rtol=1e-6)
      for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_generic_chunked_with_labels_and_top_k():
  s, t = _inputs((3, 4, 8), seed=2)
  rng = np.random.default_rng(3)
  labels = jnp.asarray(rng.integers(0, 8, size=(3, 4)), jnp.int32)
  where = jnp.asarray(rng.random((3, 4)) > 0.25)
  np.testing.assert_allclose(
      losses.chunked(losses.dkd, chunk_size=5)(s, t, labels, where=where,
                                               temperature=2.0),
      losses.dkd(s, t, labels, where=where, temperature=2.0),
      rtol=1e-5, atol=1e-6)
  values, indices = jax.lax.top_k(t, 3)
  np.testing.assert_allclose(
      losses.chunked(losses.sparse_kd, chunk_size=7)(s, values, indices),
      losses.sparse_kd(s, values, indices), rtol=1e-6, atol=1e-7)
  # Traced hyper-parameters (TAID's t) pass through, also under jit.
  fn = jax.jit(lambda a, b, tau: losses.chunked(losses.taid, chunk_size=5)(
      a, b, t=tau))
  np.testing.assert_allclose(fn(s, t, 0.3), losses.taid(s, t, t=0.3),
                             rtol=1e-6, atol=1e-7)


def test_bf16_and_jit():
  s, t = _inputs((2, 6, 16), seed=4)
  s, t = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  fn = jax.jit(jax.value_and_grad(
      lambda a: losses.chunked_kd(a, t, chunk_size=4).mean()))
  value, grad = fn(s)
  want_value, want_grad = jax.value_and_grad(
      lambda a: losses.kd(a, t).mean())(s)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad, np.float32),
                             np.asarray(want_grad, np.float32), rtol=1e-2,
                             atol=1e-4)


def test_errors_name_the_wrapped_loss():
  s, t = _inputs()
  with pytest.raises(ValueError, match=r"^kd: .*vocabulary/class sizes differ"):
    losses.chunked_kd(s, t[..., :4])
  with pytest.raises(ValueError, match="chunk_size"):
    losses.chunked(losses.kd, chunk_size=0)
  with pytest.raises(ValueError, match="^kd: temperature"):
    losses.chunked_kd(s, t, temperature=-1.0)
