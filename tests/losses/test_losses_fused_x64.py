"""Every `kdjax.losses.fused_*` loss with `jax_enable_x64` on (issue 25).

With x64 enabled `jnp.argmax` and `jnp.arange` give int64, and the streaming
log-sum-exp's argmax carry (started as int32) used to come back int64 from the
`lax.scan` body: a TypeError for every fused loss, float32 inputs included.
Here each loss runs under `jax.enable_x64(True)` (a context manager in jax
0.10, so the rest of the session keeps 32-bit defaults) and its value and
gradients must equal the unfused loss on materialised logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

CASES = {
    "kd": (losses.fused_kd, losses.kd, {}),
    "forward_kl": (losses.fused_forward_kl, losses.forward_kl, {}),
    "reverse_kl": (losses.fused_reverse_kl, losses.reverse_kl, {}),
    "generalized_jsd": (losses.fused_generalized_jsd, losses.generalized_jsd,
                        {"beta": 0.3}),
    "skew_forward_kl": (losses.fused_skew_forward_kl, losses.skew_forward_kl,
                        {"alpha": 0.2}),
    "skew_reverse_kl": (losses.fused_skew_reverse_kl, losses.skew_reverse_kl,
                        {"alpha": 0.2}),
    "total_variation": (losses.fused_total_variation, losses.total_variation,
                        {}),
}
# V=11: chunks of 4 (the two-pass scan, a shifted last block) and of 64 (one
# block, the one-pass path); 10 tokens in chunks of 3.
CHUNKINGS = {"scan": {"vocab_chunk_size": 4, "token_chunk_size": 3},
             "one_block": {"vocab_chunk_size": 64, "token_chunk_size": 3}}


def test_every_fused_loss_is_covered():
  assert sorted("fused_" + name for name in CASES) == sorted(
      losses.fused.__all__)


# Every loss on float32 inputs in several vocabulary blocks (where the scan
# failed), and one loss on each other path (one block; float64 inputs).
SETTINGS = ([(name, "scan", "float32") for name in sorted(CASES)]
            + [("kd", "one_block", "float32"), ("generalized_jsd", "scan",
                                                "float64")])


@pytest.mark.parametrize("name,chunking,dtype", SETTINGS)
def test_fused_loss_with_x64_equals_unfused(name, chunking, dtype):
  fused, unfused, hyper = CASES[name]
  rng = np.random.default_rng(0)
  where = np.arange(10).reshape(2, 5) % 4 != 3
  with jax.enable_x64(True):
    cast = lambda x: jnp.asarray(x, dtype)
    hs, ht = cast(rng.normal(size=(2, 5, 4))), cast(rng.normal(size=(2, 5, 6)))
    ws = cast(2 * rng.normal(size=(4, 11)))
    wt = cast(2 * rng.normal(size=(6, 11)))

    def total(loss, a, b):
      return jnp.sum(loss(a, b, ht, wt, temperature=1.5, where=where, **hyper))

    got, got_grads = jax.value_and_grad(
        lambda a, b: total(lambda *x, **k: fused(*x, **k, **CHUNKINGS[chunking]),
                           a, b), argnums=(0, 1))(hs, ws)
    want, want_grads = jax.value_and_grad(
        lambda a, b: total(lambda s_h, s_w, t_h, t_w, **k: unfused(
            s_h @ s_w, t_h @ t_w, **k), a, b), argnums=(0, 1))(hs, ws)
    assert got.dtype == jnp.dtype(dtype)
  tolerance = 1e-5 if dtype == "float32" else 1e-10
  np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
  for got_grad, want_grad in zip(got_grads, want_grads):
    np.testing.assert_allclose(got_grad, want_grad, rtol=tolerance,
                               atol=tolerance)
  # The context restored 32-bit defaults for the rest of the session.
  assert jnp.zeros(()).dtype == jnp.float32
