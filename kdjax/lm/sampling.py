"""Next-token sampling: temperature, top-k, top-p (nucleus) and greedy, as pure jax functions.

The filters follow the order of Hugging Face's `generate` (temperature, then top-k, then top-p
on what top-k kept). Top-k keeps the `k` largest logits (ties at the k-th value are all kept);
top-p (Holtzman et al. 2020) keeps the smallest set of most probable tokens whose mass is
>= p (always at least the most probable token). Filtered tokens get logit -inf, so the
sampling distribution is `softmax(filter_logits(logits))`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import validation


class SamplingConfig(NamedTuple):
  """Static sampling settings (hashable: a jit static argument).

  Attributes:
    temperature: logits are divided by it (> 0); greedy tokens do not depend on it, their
      reported log-probabilities do.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens with mass >= top_p (1.0: all).
    greedy: take the most likely token instead of sampling.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False


def check_sampling(temperature, top_k, top_p, greedy, *, where: str) -> SamplingConfig:
  """Validates the settings (Python values), naming `where` in the one-line error."""
  validation.require(temperature, validation.POSITIVE, f"{where}: temperature")
  validation.require(top_k, validation.NON_NEGATIVE_INT, f"{where}: top_k")
  validation.require(top_p, validation.interval(0.0, 1.0, low_inclusive=False),
                     f"{where}: top_p")
  if not isinstance(greedy, bool):
    raise validation.ConfigError(f"{where}: greedy must be True or False, got {greedy!r}.")
  return SamplingConfig(float(temperature), int(top_k), float(top_p), greedy)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature-scaled logits with the tokens top-k / top-p remove set to -inf.

  Args:
    logits: [..., V] float.
    temperature, top_k, top_p: see `SamplingConfig` (static Python numbers).

  Returns:
    [..., V] float32; `softmax` of it is the sampling distribution.
  """
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probabilities = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    mass_before = jnp.cumsum(sorted_probabilities, axis=-1) - sorted_probabilities
    # A token stays while the more likely tokens before it hold less than p: the kept set is the
    # shortest prefix of the sorted distribution with mass >= p (the first token always stays).
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sampling_log_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """[..., V] log-probabilities of the sampling distribution (filtered, temperature-scaled)."""
  return jax.nn.log_softmax(filter_logits(logits, temperature=config.temperature,
                                          top_k=config.top_k, top_p=config.top_p), axis=-1)


def sample_token(logits: jax.Array, rng, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, greedy: bool = False):
  """Draws one token per row: the pure sampling step (callable inside jit / scan).

  Args:
    logits: [B, V] next-token logits.
    rng: a PRNG key (unused, may be None, when greedy).
    temperature, top_k, top_p, greedy: static settings (see `SamplingConfig`).

  Returns:
    (tokens [B] int32, log_probs [B] float32): the tokens and their log-probabilities under the
    sampling distribution (for greedy, under the distribution sampling would use).
  """
  config = SamplingConfig(temperature, top_k, top_p, greedy)
  log_probs = sampling_log_probs(logits, config)
  if greedy:
    tokens = jnp.argmax(log_probs, axis=-1)
  else:
    tokens = jax.random.categorical(rng, log_probs, axis=-1)
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
