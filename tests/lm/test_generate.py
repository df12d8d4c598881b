"""Generation: the sampling filters on hand-made logits, cached == uncached greedy tokens,
one compilation per shape, sampled tokens following a known distribution, use inside jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kdjax import lm, models
from kdjax.lm.generate import cached_module
from kdjax.validation import ConfigError
from lm_table_models import joint_of_two, random_lm_variables, random_tables, table, table_apply

VOCAB = 259

# Probabilities in a shuffled order, so that the filters must map sorted ranks back.
HAND_PROBABILITIES = np.array([0.15, 0.5, 0.05, 0.3])
HAND_LOGITS = jnp.log(jnp.asarray(HAND_PROBABILITIES, jnp.float32))[None]


def _kept(logits):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits)[0])).tolist())


def test_temperature_divides_the_logits():
  logits = jnp.array([[1.0, -2.0, 0.5, 3.0]])
  filtered = lm.filter_logits(logits, temperature=2.0)
  np.testing.assert_allclose(filtered, np.array([[0.5, -1.0, 0.25, 1.5]]), rtol=1e-6)


@pytest.mark.parametrize("top_k, kept", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (0, {0, 1, 2, 3}),
                                         (9, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_largest(top_k, kept):
  filtered = lm.filter_logits(HAND_LOGITS, top_k=top_k)
  assert _kept(filtered) == kept
  np.testing.assert_array_equal(np.asarray(filtered)[0, sorted(kept)],
                                np.asarray(HAND_LOGITS)[0, sorted(kept)])


# Sorted masses 0.5, 0.8, 0.95, 1.0: the smallest set with mass >= p.
@pytest.mark.parametrize("top_p, kept", [(0.3, {1}), (0.45, {1}), (0.7, {1, 3}), (0.85, {0, 1, 3}),
                                         (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_with_mass_p(top_p, kept):
  assert _kept(lm.filter_logits(HAND_LOGITS, top_p=top_p)) == kept


def test_top_p_applies_to_what_top_k_and_temperature_left():
  # top_k=3 renormalises {0.5, 0.3, 0.15} to {0.526, 0.316, 0.158} (masses 0.526, 0.842): p=0.82
  # is met by two tokens, while without top_k (masses 0.5, 0.8, 0.95) it needs three.
  assert _kept(lm.filter_logits(HAND_LOGITS, top_k=3, top_p=0.82)) == {1, 3}
  assert _kept(lm.filter_logits(HAND_LOGITS, top_p=0.82)) == {0, 1, 3}
  assert _kept(lm.filter_logits(HAND_LOGITS, top_k=3, top_p=0.85)) == {0, 1, 3}
  # Temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025, normalised 0.685,
  # 0.247, 0.062, 0.007: p=0.68 is met by the first token alone.
  assert _kept(lm.filter_logits(HAND_LOGITS, temperature=0.5, top_p=0.68)) == {1}
  assert _kept(lm.filter_logits(HAND_LOGITS, temperature=0.5, top_p=0.69)) == {1, 3}


def test_sample_token_greedy_and_sampled_frequencies():
  tokens, log_probs = lm.sample_token(HAND_LOGITS, None, greedy=True, temperature=2.0)
  assert int(tokens[0]) == 1
  tempered = HAND_PROBABILITIES ** 0.5 / np.sum(HAND_PROBABILITIES ** 0.5)
  np.testing.assert_allclose(log_probs[0], np.log(tempered[1]), rtol=1e-5)
  rows = 20_000
  sampled, log_probs = jax.jit(lambda key: lm.sample_token(
      jnp.broadcast_to(HAND_LOGITS, (rows, 4)), key, top_k=3, top_p=0.8))(jax.random.key(0))
  expected = np.array([0.0, 0.5, 0.0, 0.3]) / 0.8  # top-k drops 2, top-p then drops 0.
  frequencies = np.bincount(np.asarray(sampled), minlength=4) / rows
  np.testing.assert_allclose(frequencies, expected, atol=0.015)
  np.testing.assert_allclose(np.exp(log_probs), expected[np.asarray(sampled)], rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_lm():
  """lm_tiny with an untied unembedding (a random tied model greedily repeats its input)."""
  module = models.get_model("lm_tiny", num_classes=VOCAB, tie_embeddings=False)
  prompts = jax.random.randint(jax.random.key(1), (2, 3), 0, VOCAB, jnp.int32)
  return models.apply_fn(module), random_lm_variables(module, 0), prompts


def test_cached_and_uncached_greedy_agree_compile_once_and_run_inside_jit(tiny_lm):
  apply_fn, variables, prompts = tiny_lm
  assert cached_module(apply_fn, True) is apply_fn.module
  traced = chex.assert_max_traces(lm.generate_fn, n=1)
  # A train step calls generate_fn inside its own jit, with traced variables and prompts.
  step = jax.jit(lambda v, p: traced(apply_fn, v, p, max_new_tokens=6, greedy=True))
  cached = step(variables, prompts)
  uncached = lm.generate(apply_fn, variables, prompts, max_new_tokens=6, greedy=True,
                         use_cache=False)
  assert cached.tokens.shape == (2, 9) and cached.log_probs.shape == (2, 6)
  np.testing.assert_array_equal(cached.tokens[:, :3], prompts)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_allclose(cached.log_probs, uncached.log_probs, atol=1e-5)
  assert len(set(np.asarray(cached.tokens[0, 3:]).tolist())) > 2  # Not one repeated token.
  # New values of the same shapes: no retrace (assert_max_traces would raise).
  other = step(jax.tree_util.tree_map(lambda x: x * 1.5, variables), prompts[::-1])
  assert not np.array_equal(other.tokens, cached.tokens)
  chex.clear_trace_counter()


def test_sampled_tokens_follow_the_model_distribution():
  # Any apply function works (no Flax module: the uncached path); 2 new tokens, V = 4.
  probabilities = random_tables(0, length=4, vocab=4)
  rows = 4000
  prompts = jnp.tile(jnp.array([[2, 1]], jnp.int32), (rows, 1))
  out = lm.generate(table_apply, table(probabilities), prompts, max_new_tokens=2,
                    rng=jax.random.key(7))
  new = np.asarray(out.tokens[:, 2:])
  counts = np.bincount(new[:, 0] * 4 + new[:, 1], minlength=16)
  joint = joint_of_two(probabilities, last_prompt_token=1, prompt_length=2).ravel()
  assert stats.chisquare(counts, rows * joint).pvalue > 1e-3
  # The test has power: the same counts reject a different model.
  other = joint_of_two(random_tables(1, length=4, vocab=4), 1, 2).ravel()
  assert stats.chisquare(counts, rows * other).pvalue < 1e-6
  expected_log_probs = np.log(np.stack([probabilities[1, 1][new[:, 0]],
                                        probabilities[2][new[:, 0], new[:, 1]]], 1))
  np.testing.assert_allclose(out.log_probs, expected_log_probs, rtol=1e-4)


def test_bad_settings_fail_before_any_work(tiny_lm):
  apply_fn, variables, prompts = tiny_lm
  cases = [
      (dict(max_new_tokens=4), ValueError, r"rng is required for sampling"),
      (dict(max_new_tokens=0, greedy=True), ConfigError, r"max_new_tokens must be a positive"),
      (dict(max_new_tokens=4, greedy=True, top_p=0.0), ConfigError, r"top_p must be a number in"),
      (dict(max_new_tokens=4, greedy=True, temperature=0), ConfigError,
       r"temperature must be a positive"),
      (dict(max_new_tokens=4, greedy=True, top_k=-1), ConfigError, r"top_k must be an integer"),
      (dict(max_new_tokens=510, greedy=True), ValueError,
       r"prompt length 3 \+ max_new_tokens 510 = 513 exceeds the model's max_length 512"),
  ]
  for kwargs, error, message in cases:
    with pytest.raises(error, match=message):
      lm.generate_fn(apply_fn, variables, prompts, **kwargs)
  with pytest.raises(ValueError, match=r"prompts must be integer token ids \[B, P\]"):
    lm.generate_fn(apply_fn, variables, prompts.astype(jnp.float32), max_new_tokens=2,
                   greedy=True)
