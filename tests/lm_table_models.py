"""Helpers for the LM tests: a hand-built causal "language model" with fixed next-token
distributions (for exact distribution tests), and random TransformerLM variables without
compiling `init`.

`table_apply` is an apply function of the kdjax contract with variables
`{'probabilities': [T, V, V]}`: its next-token distribution at position t, after token x_t, is
probabilities[t, x_t] (position- and token-dependent). The table is a variable, not a closure,
so target and draft share one apply function and one compilation per shape.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.models.output import Output


def table_apply(variables, tokens, *, train=False, rng=None):
  del train, rng
  log_table = jnp.log(variables["probabilities"])
  logits = log_table[jnp.arange(tokens.shape[1])[None, :], tokens]  # [B, T, V]
  return Output(logits, {"hidden": logits, "embedding": logits}), {}


def table(probabilities):
  return {"probabilities": jnp.asarray(probabilities, jnp.float32)}


def random_tables(seed, length, vocab, concentration=1.0):
  """[length, vocab, vocab] random distributions (Dirichlet rows)."""
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.full(vocab, concentration), size=(length, vocab))


def joint_of_two(probabilities, last_prompt_token, prompt_length):
  """[V, V] exact P(x_P = a, x_{P+1} = b) for a table model after a prompt."""
  first = probabilities[prompt_length - 1, last_prompt_token]  # [V]
  second = probabilities[prompt_length]  # [V(previous), V]
  return first[:, None] * second


def random_lm_variables(module, seed):
  """TransformerLM variables drawn in numpy (N(0, 0.02^2) weights, unit norm scales): the
  shapes come from `eval_shape`, so no `init` is compiled."""
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0),
                                                        jnp.zeros((1, 2), jnp.int32)))
  rng = np.random.default_rng(seed)
  draw = lambda path, leaf: jnp.asarray(
      np.ones(leaf.shape) if path[-1].key == "scale" else rng.normal(0, 0.02, leaf.shape),
      jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)
