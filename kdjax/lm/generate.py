"""Autoregressive generation: one `lax.scan` over the new tokens, with or without a KV cache.

    out = generate(apply_fn, variables, prompts, max_new_tokens=32, rng=key, top_p=0.9)
    out.tokens     # [B, P + N] prompts followed by the new tokens
    out.log_probs  # [B, N] each new token's log-probability under the sampling distribution

Two paths give the same tokens (up to float rounding in the logits):
  * cached: when `use_cache` and `apply_fn.module` has a KV cache (a Flax module with
    `decode(tokens, cache)`, `init_cache(batch, length)` and `max_length`: kdjax's
    `TransformerLM` as `kdjax.models.apply_fn` sets it, and every pretrained family's
    `DecoderLM`), the prompt is prefilled into a KV cache of length P + N and each step runs
    the model on one token: O(P + N) work per token.
  * uncached: any apply function of the kdjax contract (`apply(variables, tokens, *, train,
    rng) -> (Output, state)`, e.g. an NNX model through `kdjax.models.adapters`) that is causal
    (position t's logits depend on tokens <= t only): each step runs the full model on a
    fixed-size [B, P + N] buffer (the positions not yet generated hold 0s that causality hides)
    and reads the logits at the last filled position. One shape, so one compilation.

`generate_fn` is the un-jitted, traceable function: call it inside a jitted train step (on-policy
distillation, GKD) with traced `variables`, `prompts` and `rng`; the keyword settings are static
Python values. `generate` is `generate_fn` under `jax.jit`; it compiles once per apply function,
prompt shape and settings (pass the same `apply_fn` object each time: a new closure is a new
static argument and compiles again).
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.lm.sampling import check_sampling, sample_token


class GenerateOutput(NamedTuple):
  """Attributes:
    tokens: [B, P + N] int32, the prompts followed by the generated tokens.
    log_probs: [B, N] float32, log-probability of each generated token under the sampling
      distribution it was drawn from (temperature-scaled and filtered).
  """
  tokens: jax.Array
  log_probs: jax.Array


def check_prompts(prompts, where: str) -> None:
  if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer) or prompts.shape[1] < 1:
    raise ValueError(f"{where}: prompts must be integer token ids [B, P] with P >= 1, got shape "
                     f"{tuple(prompts.shape)} dtype {prompts.dtype}.")


# What a module needs for the cached path (the KV-cache contract of `kdjax.models.transformer`
# and `kdjax.models.pretrained.decoder`).
CACHE_METHODS = ("decode", "init_cache", "max_length")


def cached_module(apply_fn, use_cache: bool):
  """The module behind `apply_fn` when the KV-cache path applies (it has `CACHE_METHODS`),
  else None."""
  module = getattr(apply_fn, "module", None)
  if not use_cache or module is None:
    return None
  return module if all(hasattr(module, name) for name in CACHE_METHODS) else None


def generate_fn(apply_fn, variables, prompts: jax.Array, *, max_new_tokens: int,
                rng: Optional[jax.Array] = None, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, greedy: bool = False,
                use_cache: bool = True) -> GenerateOutput:
  """Generates `max_new_tokens` tokens after each prompt (traceable; see the module docstring).

  Args:
    apply_fn: a causal LM apply function (`kdjax.models.apply_fn(module)` or any function of the
      apply contract returning `Output(logits [B, T, V], ...)`).
    variables: its variables.
    prompts: [B, P] integer token ids (every row the same length P).
    max_new_tokens: N, a positive Python int.
    rng: a PRNG key; required unless `greedy`.
    temperature, top_k, top_p, greedy: sampling settings (`kdjax.lm.sampling`).
    use_cache: use the KV cache when `apply_fn.module` has one (`CACHE_METHODS`).

  Returns:
    GenerateOutput(tokens [B, P + N] int32, log_probs [B, N] float32).
  """
  where = "generate"
  config = check_sampling(temperature, top_k, top_p, greedy, where=where)
  validation.require(max_new_tokens, validation.POSITIVE_INT, f"{where}: max_new_tokens")
  check_prompts(prompts, where)
  if rng is None and not greedy:
    raise ValueError(f"{where}: rng is required for sampling (greedy=False).")
  prompts = prompts.astype(jnp.int32)
  batch, prompt_length = prompts.shape
  total = prompt_length + max_new_tokens
  # With greedy and no rng the scan still needs one input per step; the keys are then unused.
  step_keys = (jax.random.split(rng, max_new_tokens) if rng is not None
               else jnp.zeros((max_new_tokens,), jnp.int32))
  sample = lambda logits, key: sample_token(logits, None if greedy else key, **config._asdict())

  module = cached_module(apply_fn, use_cache)
  if module is not None:
    if total > module.max_length:
      raise ValueError(f"{where}: prompt length {prompt_length} + max_new_tokens "
                       f"{max_new_tokens} = {total} exceeds the model's max_length "
                       f"{module.max_length}.")
    decode = functools.partial(module.apply, variables, method="decode")
    logits, cache = decode(prompts, module.init_cache(batch, total))
    first_token, first_log_prob = sample(logits[:, -1], step_keys[0])

    def cached_step(carry, key):
      cache, token = carry
      logits, cache = decode(token[:, None], cache)
      token, log_prob = sample(logits[:, 0], key)
      return (cache, token), (token, log_prob)

    _, (tokens, log_probs) = jax.lax.scan(cached_step, (cache, first_token), step_keys[1:])
    new_tokens = jnp.concatenate([first_token[:, None], tokens.T], axis=1)
    log_probs = jnp.concatenate([first_log_prob[:, None], log_probs.T], axis=1)
    return GenerateOutput(jnp.concatenate([prompts, new_tokens], axis=1), log_probs)

  buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_length].set(prompts)

  def uncached_step(buffer, inputs):
    step, key = inputs
    output, _ = apply_fn(variables, buffer, train=False, rng=None)
    logits = jax.lax.dynamic_index_in_dim(output.logits, prompt_length - 1 + step, axis=1,
                                          keepdims=False)
    token, log_prob = sample(logits, key)
    buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, prompt_length + step))
    return buffer, log_prob

  buffer, log_probs = jax.lax.scan(uncached_step, buffer,
                                   (jnp.arange(max_new_tokens), step_keys))
  return GenerateOutput(buffer, log_probs.T)


# `generate_fn` under jit (jit keeps its docstring); the settings and `apply_fn` are static.
generate = jax.jit(generate_fn, static_argnames=(
    "apply_fn", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "use_cache"))
