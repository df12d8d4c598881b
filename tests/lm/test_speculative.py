"""Speculative decoding: greedy output equals the target's greedy decoding, sampled output
follows the target's distribution (chi-squared), acceptance rate sum_x min(p, q) on a hand case,
draft == target accepts everything, eq. 1 of Leviathan et al. by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kdjax import lm, models
from kdjax.lm import speculative
from kdjax.validation import ConfigError
from lm_table_models import joint_of_two, random_tables, table, table_apply

# Target and draft are one apply function (a jit static argument) with two tables as variables,
# so the tests below share compilations: one per gamma and shape.
TARGET_TABLE = random_tables(0, length=16, vocab=4)
DRAFT_TABLE = random_tables(1, length=16, vocab=4)
TARGET, DRAFT = table(TARGET_TABLE), table(DRAFT_TABLE)
ROWS = 4000


def _greedy_reference(prompts, new_tokens):
  """The target table's greedy decoding, in numpy."""
  tokens = [list(row) for row in np.asarray(prompts)]
  for row in tokens:
    for _ in range(new_tokens):
      row.append(int(np.argmax(TARGET_TABLE[len(row) - 1, row[-1]])))
  return np.array(tokens)


@pytest.mark.parametrize("gamma", [1, 3, pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(5, marks=pytest.mark.slow)])
def test_greedy_output_equals_target_greedy(gamma):
  prompts = jnp.array([[0, 1], [2, 3], [3, 3]], jnp.int32)
  out = speculative.speculative_generate(table_apply, TARGET, table_apply, DRAFT, prompts,
                                         max_new_tokens=9, gamma=gamma, greedy=True)
  np.testing.assert_array_equal(out.tokens, _greedy_reference(prompts, 9))
  np.testing.assert_array_equal(out.proposed, gamma * out.rounds)
  # The draft disagrees with the target sometimes but not always: both branches ran.
  assert 0 < int(out.accepted.sum()) < int(out.proposed.sum())
  assert np.all(out.rounds < 9)  # Fewer target passes than tokens.


@pytest.mark.parametrize("gamma", [1, 3])
def test_sampled_output_follows_the_target_distribution(gamma):
  rows = ROWS
  prompts = jnp.tile(jnp.array([[2, 1]], jnp.int32), (rows, 1))
  out = speculative.speculative_generate(table_apply, TARGET, table_apply, DRAFT, prompts,
                                         max_new_tokens=2, gamma=gamma, rng=jax.random.key(11))
  new = np.asarray(out.tokens[:, 2:])
  counts = np.bincount(new[:, 0] * 4 + new[:, 1], minlength=16)
  target_joint = joint_of_two(TARGET_TABLE, last_prompt_token=1, prompt_length=2).ravel()
  assert stats.chisquare(counts, rows * target_joint).pvalue > 1e-3
  # Power: the draft's own distribution is rejected by the same counts.
  draft_joint = joint_of_two(DRAFT_TABLE, 1, 2).ravel()
  assert stats.chisquare(counts, rows * draft_joint).pvalue < 1e-6
  assert 0 < int(out.accepted.sum()) < int(out.proposed.sum())


P_HAND = table(np.broadcast_to([0.1, 0.2, 0.3, 0.4], (16, 4, 4)))
Q_HAND = table(np.broadcast_to([0.4, 0.3, 0.2, 0.1], (16, 4, 4)))


def test_acceptance_rate_equals_sum_of_min_p_q():
  # sum_x min(p(x), q(x)) = 0.1 + 0.2 + 0.2 + 0.1 = 0.6 (Leviathan et al. Corollary 3.6). With
  # gamma = 1 every proposed token is tested, each with acceptance probability 0.6 (p and q
  # are the same at every position).
  prompts = jnp.zeros((ROWS, 2), jnp.int32)
  out = speculative.speculative_generate(table_apply, P_HAND, table_apply, Q_HAND, prompts,
                                         max_new_tokens=2, gamma=1, rng=jax.random.key(3))
  statistics = speculative.decoding_statistics(out, gamma=1)
  assert statistics["proposed"] == statistics["rounds"] > ROWS  # Some rows needed 2 rounds.
  # Standard error about sqrt(0.24 / 6000) = 0.0063.
  assert abs(statistics["acceptance_rate"] - 0.6) < 0.025
  assert statistics["alpha"] == statistics["acceptance_rate"]  # gamma = 1: every token tested.
  # The output still follows p: frequencies of the new tokens.
  frequencies = np.bincount(np.asarray(out.tokens[:, 2:]).ravel(), minlength=4) / (2 * ROWS)
  np.testing.assert_allclose(frequencies, [0.1, 0.2, 0.3, 0.4], atol=0.02)


def test_draft_equal_to_target_accepts_everything():
  prompts = jnp.tile(jnp.array([[2, 1]], jnp.int32), (ROWS, 1))
  out = speculative.speculative_generate(table_apply, TARGET, table_apply, TARGET, prompts,
                                         max_new_tokens=2, gamma=3, rng=jax.random.key(4))
  statistics = speculative.decoding_statistics(out, gamma=3, cost_ratio=0.0)
  assert statistics["acceptance_rate"] == 1.0 and statistics["rejections"] == 0
  # 2 new tokens at 4 per round: one round per row (its overshoot is cut).
  np.testing.assert_array_equal(out.rounds, 1)
  assert statistics["tokens_per_round"] == 4.0 and statistics["implied_speedup"] == 4.0


def test_expected_speedup_by_hand():
  # alpha = 0.8, gamma = 4, c = 0.1: (1 - 0.8^5) / (0.2 * 1.4) = 0.67232 / 0.28.
  assert speculative.expected_speedup(0.8, 4, 0.1) == pytest.approx(2.401142857)
  assert speculative.expected_speedup(1.0, 3, 0.5) == pytest.approx(4 / 2.5)
  assert speculative.expected_speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)


def test_bad_settings_fail_with_clear_messages():
  prompts = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ConfigError, match=r"gamma must be a positive integer, got 0"):
    speculative.speculative_generate_fn(table_apply, TARGET, table_apply, DRAFT, prompts,
                                        max_new_tokens=2, gamma=0, greedy=True)
  with pytest.raises(ValueError, match=r"rng is required"):
    speculative.speculative_generate_fn(table_apply, TARGET, table_apply, DRAFT, prompts,
                                        max_new_tokens=2, gamma=2)
  module = models.get_model("lm_tiny", num_classes=4)
  apply_fn = models.apply_fn(module)
  with pytest.raises(ValueError, match=r"target runs on a buffer of prompt length 3 \+ "
                                       r"max_new_tokens 500 \+ gamma 10 = 513 tokens, more "
                                       r"than its max_length 512"):
    speculative.speculative_generate_fn(apply_fn, {}, apply_fn, {}, prompts,
                                        max_new_tokens=500, gamma=10, greedy=True)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_transformer_greedy_output_equals_target_greedy(gamma):
  module = models.get_model("lm_tiny", num_classes=259, tie_embeddings=False)
  variables = models.init_variables(module, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # A draft near the target, so that some but not all of its proposals are accepted.
  noise = lambda x, key: x + 0.01 * jax.random.normal(key, x.shape)
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  draft_variables = jax.tree_util.tree_unflatten(tree, [noise(x, k) for x, k in zip(leaves, keys)])
  apply_fn = models.apply_fn(module)
  prompts = jax.random.randint(jax.random.key(1), (3, 4), 0, 259, jnp.int32)
  reference = lm.generate(apply_fn, variables, prompts, max_new_tokens=16, greedy=True)
  result = speculative.speculative_decode(apply_fn, variables, apply_fn, draft_variables, prompts,
                                          max_new_tokens=16, gamma=gamma, greedy=True,
                                          cost_ratio=1.0)
  np.testing.assert_array_equal(result.tokens, reference.tokens)
  assert 0 < result.statistics["accepted"] < result.statistics["proposed"]
  assert result.statistics["tokens_per_second"] > 0
