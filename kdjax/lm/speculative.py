"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

Each round, per sequence: the draft model q proposes `gamma` tokens autoregressively; the
target model p scores all of them in one forward pass; draft token x_j is accepted with
probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token is drawn from
norm(max(0, p_j - q_j)) and the round ends; when all gamma are accepted one more token is drawn
from p_gamma. Every round thus adds between 1 and gamma + 1 tokens, and the output follows the
target's sampling distribution exactly (Leviathan et al. Appendix A.1). With `greedy=True` the
draft proposes its argmax and a draft token is accepted iff it is the target's argmax; the
output then equals the target's greedy decoding. p and q are the sampling distributions after
temperature, top-k and top-p (`kdjax.lm.sampling`), so the output follows what
`kdjax.lm.generate` samples from the target with the same settings.

Implementation: batched with per-row bookkeeping (each row has its own length; a row that is
done stops changing while the others finish), one `lax.while_loop` over rounds and a
`lax.scan` over the gamma draft steps. Forwards are UNCACHED: the draft and the target run the
full model on a fixed [B, P + N + gamma] buffer (positions not yet valid are hidden by
causality), so any causal apply function of the kdjax contract works; the cost per forward
does not depend on how far decoding is, which the implied speed-up below assumes anyway.

Statistics (`decoding_statistics`): proposed and accepted draft tokens, rounds, the acceptance
rate accepted / proposed, accepted tokens per round, and the speed-up implied by Leviathan et
al.'s eq. 1, `(1 - alpha^(gamma + 1)) / ((1 - alpha) (gamma c + 1))` with c = draft / target
forward time. There alpha is the probability that one draft token is accepted; the acceptance
rate counts the draft tokens proposed after a rejection too, so it underestimates alpha for
gamma > 1, and alpha is estimated as accepted / (accepted + rejections) instead (every draft
token actually tested was either accepted or the round's one rejection).
"""

import time
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.lm import compiled as compiled_lib
from kdjax.lm.generate import check_prompts
from kdjax.lm.sampling import check_sampling, sampling_log_probs


class SpeculativeOutput(NamedTuple):
  """Attributes:
    tokens: [B, P + N] int32, the prompts followed by the generated tokens.
    proposed: [B] int32, draft tokens proposed (gamma per round).
    accepted: [B] int32, draft tokens accepted.
    rejections: [B] int32, rounds that ended with a rejected draft token.
    rounds: [B] int32, rounds (target forward passes) the row took part in.
  """
  tokens: jax.Array
  proposed: jax.Array
  accepted: jax.Array
  rejections: jax.Array
  rounds: jax.Array


def _write(buffer, positions, tokens):
  """buffer [B, L] with tokens [B] written at positions [B] (positions >= L write nothing)."""
  hit = jnp.arange(buffer.shape[1])[None, :] == positions[:, None]
  return jnp.where(hit, tokens[:, None], buffer)


def _check_length(apply_fn, name: str, prompt_length: int, max_new_tokens: int, gamma: int):
  max_length = getattr(getattr(apply_fn, "module", None), "max_length", None)
  length = prompt_length + max_new_tokens + gamma
  if max_length is not None and length > max_length:
    raise ValueError(f"speculative_generate: the {name} runs on a buffer of prompt length "
                     f"{prompt_length} + max_new_tokens {max_new_tokens} + gamma {gamma} = "
                     f"{length} tokens, more than its max_length {max_length}.")


def speculative_generate_fn(target_apply, target_variables, draft_apply, draft_variables,
                            prompts: jax.Array, *, max_new_tokens: int, gamma: int,
                            rng: Optional[jax.Array] = None, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0,
                            greedy: bool = False) -> SpeculativeOutput:
  """Speculative decoding of `max_new_tokens` tokens per prompt (traceable, un-jitted).

  Args:
    target_apply, target_variables: the model whose distribution the output follows.
    draft_apply, draft_variables: the cheaper proposal model (same vocabulary).
    prompts: [B, P] integer token ids.
    max_new_tokens: N, a positive Python int.
    gamma: draft tokens proposed per round, a positive Python int.
    rng: a PRNG key; required unless `greedy`.
    temperature, top_k, top_p, greedy: sampling settings applied to both models.

  Returns:
    SpeculativeOutput (tokens [B, P + N] and per-row counts).
  """
  where = "speculative_generate"
  config = check_sampling(temperature, top_k, top_p, greedy, where=where)
  validation.require(max_new_tokens, validation.POSITIVE_INT, f"{where}: max_new_tokens")
  validation.require(gamma, validation.POSITIVE_INT, f"{where}: gamma")
  check_prompts(prompts, where)
  if rng is None and not greedy:
    raise ValueError(f"{where}: rng is required for sampling (greedy=False).")
  batch, prompt_length = prompts.shape
  total = prompt_length + max_new_tokens
  # An active row has length <= total - 1 and writes at most gamma + 1 tokens past it.
  buffer_length = total + gamma
  _check_length(target_apply, "target", prompt_length, max_new_tokens, gamma)
  _check_length(draft_apply, "draft", prompt_length, max_new_tokens, gamma)
  rng = jax.random.key(0) if rng is None else rng  # Greedy draws nothing.

  def log_probs_at(apply_fn, variables, buffer, positions):
    """[B, K, V] sampling log-probabilities of the next token after positions [B, K]."""
    logits = apply_fn(variables, buffer, train=False, rng=None)[0].logits
    positions = jnp.minimum(positions, buffer_length - 1)  # Finished rows read in bounds.
    return sampling_log_probs(jnp.take_along_axis(logits, positions[:, :, None], axis=1), config)

  def one_round(state):
    buffer, lengths, rng, proposed, accepted, rejections, rounds = state
    active = lengths < total
    rng, draft_rng, accept_rng, final_rng = jax.random.split(rng, 4)

    def draft_step(draft_buffer, inputs):
      step, key = inputs
      log_q = log_probs_at(draft_apply, draft_variables, draft_buffer,
                           (lengths - 1 + step)[:, None])[:, 0]
      token = (jnp.argmax(log_q, -1) if greedy
               else jax.random.categorical(key, log_q, axis=-1)).astype(jnp.int32)
      return _write(draft_buffer, lengths + step, token), (token, log_q)

    draft_buffer, (draft_tokens, log_q) = jax.lax.scan(
        draft_step, buffer, (jnp.arange(gamma), jax.random.split(draft_rng, gamma)))
    draft_tokens, log_q = draft_tokens.T, log_q.transpose(1, 0, 2)  # [B, gamma], [B, gamma, V]
    # One target pass scores the gamma draft tokens and the token after them.
    log_p = log_probs_at(target_apply, target_variables, draft_buffer,
                         lengths[:, None] - 1 + jnp.arange(gamma + 1)[None, :])
    if greedy:
      accept = draft_tokens == jnp.argmax(log_p[:, :gamma], -1)
    else:
      pick = lambda table: jnp.take_along_axis(table, draft_tokens[:, :, None], axis=-1)[..., 0]
      uniform = jax.random.uniform(accept_rng, (batch, gamma))
      # u < p/q in log space: always true when p >= q, never when p = 0.
      accept = jnp.log(uniform) < pick(log_p[:, :gamma]) - pick(log_q)
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [B]

    p_next = jnp.take_along_axis(log_p, num_accepted[:, None, None], axis=1)[:, 0]
    if greedy:
      token = jnp.argmax(p_next, -1)
    else:
      # After all gamma were accepted q is taken as 0, so the residual is p itself.
      q_padded = jnp.concatenate([jnp.exp(log_q), jnp.zeros_like(log_q[:, :1])], axis=1)
      q_next = jnp.take_along_axis(q_padded, num_accepted[:, None, None], axis=1)[:, 0]
      residual = jnp.maximum(jnp.exp(p_next) - q_next, 0.0)
      mass = jnp.sum(residual, -1, keepdims=True)
      # A rejection with p <= q everywhere has probability 0; rounding can still produce one.
      residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), jnp.exp(p_next))
      token = jax.random.categorical(final_rng, jnp.log(residual), axis=-1)
    new_buffer = _write(draft_buffer, lengths + num_accepted, token.astype(jnp.int32))
    buffer = jnp.where(active[:, None], new_buffer, buffer)
    count = lambda value: jnp.where(active, value, 0).astype(jnp.int32)
    return (buffer, lengths + count(num_accepted + 1), rng, proposed + count(gamma),
            accepted + count(num_accepted), rejections + count(num_accepted < gamma),
            rounds + count(1))

  buffer = jnp.zeros((batch, buffer_length), jnp.int32).at[:, :prompt_length].set(
      prompts.astype(jnp.int32))
  zeros = jnp.zeros((batch,), jnp.int32)
  state = (buffer, jnp.full((batch,), prompt_length, jnp.int32), rng, zeros, zeros, zeros, zeros)
  state = jax.lax.while_loop(lambda s: jnp.any(s[1] < total), one_round, state)
  buffer, _, _, proposed, accepted, rejections, rounds = state
  return SpeculativeOutput(buffer[:, :total], proposed, accepted, rejections, rounds)


# `speculative_generate_fn` under jit; apply functions and settings are static.
speculative_generate = jax.jit(speculative_generate_fn, static_argnames=(
    "target_apply", "draft_apply", "max_new_tokens", "gamma", "temperature", "top_k", "top_p",
    "greedy"))


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
  """Leviathan et al. eq. 1: expected wall-time improvement factor of speculative decoding.

  `(1 - alpha^(gamma + 1)) / ((1 - alpha) (gamma c + 1))`, with alpha the per-token acceptance
  probability and c the draft / target forward-time ratio; alpha = 1 gives its limit
  `(gamma + 1) / (gamma c + 1)`.
  """
  tokens_per_round = gamma + 1.0 if alpha >= 1.0 else (1 - alpha**(gamma + 1)) / (1 - alpha)
  return tokens_per_round / (gamma * cost_ratio + 1.0)


def decoding_statistics(output: SpeculativeOutput, *, gamma: int,
                        cost_ratio: Optional[float] = None, seconds: Optional[float] = None,
                        new_tokens: Optional[int] = None) -> Dict[str, float]:
  """Summary numbers of a decoding run (see the module docstring).

  Returns a dict with 'proposed', 'accepted', 'rejections', 'rounds' (summed over rows),
  'acceptance_rate' (accepted / proposed), 'alpha' (accepted / (accepted + rejections)),
  'accepted_per_round', 'tokens_per_round' (accepted + 1 per round); with `cost_ratio` the
  'implied_speedup' (eq. 1 at alpha); with the wall-clock `seconds` and `new_tokens` (N per
  row) 'tokens_per_second' (B * N / seconds).
  """
  proposed, accepted, rejections, rounds = (float(jnp.sum(x)) for x in output[1:])
  tested = accepted + rejections
  alpha = accepted / tested if tested else 1.0
  statistics = {
      "proposed": proposed, "accepted": accepted, "rejections": rejections, "rounds": rounds,
      "acceptance_rate": accepted / proposed if proposed else 0.0,
      "alpha": alpha,
      "accepted_per_round": accepted / rounds if rounds else 0.0,
      "tokens_per_round": (accepted + rounds) / rounds if rounds else 0.0,
  }
  if cost_ratio is not None:
    statistics["implied_speedup"] = expected_speedup(alpha, gamma, cost_ratio)
  if seconds is not None and new_tokens is not None:
    statistics["tokens_per_second"] = output.tokens.shape[0] * new_tokens / seconds
  return statistics


def _best_seconds(function, repeats: int) -> float:
  jax.block_until_ready(function())  # Compile outside the timing.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function())
    best = min(best, time.perf_counter() - start)
  return best


def measure_cost_ratio(target_apply, target_variables, draft_apply, draft_variables,
                       tokens: jax.Array, *, repeats: int = 5) -> float:
  """c = draft / target forward time on `tokens` [B, T] (jitted, best of `repeats`)."""
  forward = lambda apply_fn: jax.jit(lambda v, t: apply_fn(v, t, train=False)[0].logits)
  target, draft = forward(target_apply), forward(draft_apply)
  return (_best_seconds(lambda: draft(draft_variables, tokens), repeats) /
          _best_seconds(lambda: target(target_variables, tokens), repeats))


class SpeculativeResult(NamedTuple):
  """Attributes: tokens [B, P + N] int32; the run's `decoding_statistics` (with
  'tokens_per_second' of this call, compilation included on a first call)."""
  tokens: jax.Array
  statistics: Dict[str, Any]


def speculative_decode(target_apply, target_variables, draft_apply, draft_variables,
                       prompts: jax.Array, *, max_new_tokens: int, gamma: int,
                       rng: Optional[jax.Array] = None, cost_ratio: Optional[float] = None,
                       precompile: bool = False, **sampling) -> SpeculativeResult:
  """Runs `speculative_generate` (jitted), times it and summarises it.

  `sampling` takes temperature, top_k, top_p, greedy; `cost_ratio` (for the implied speed-up)
  may come from `measure_cost_ratio`. With `precompile` the call is compiled ahead of time and
  the timing covers only the decoding; otherwise a first call's timing includes compilation.
  A precompiled executable is kept for the process (`kdjax.lm.compiled`): a later call with
  equal apply functions (code and closures), argument shapes and settings reuses it.
  """
  arguments = (target_apply, target_variables, draft_apply, draft_variables, prompts)
  settings = dict(max_new_tokens=max_new_tokens, gamma=gamma, **sampling)
  if precompile:  # Once per process for equal apply functions, shapes and settings.
    key = ("speculative_generate", compiled_lib.function_key(target_apply),
           compiled_lib.function_key(draft_apply),
           compiled_lib.abstract_key((target_variables, draft_variables, prompts, rng)),
           tuple(sorted(settings.items())))
    compiled = compiled_lib.executable(key, lambda: speculative_generate.lower(
        *arguments, rng=rng, **settings))
    run = lambda: compiled(target_variables, draft_variables, prompts, rng=rng)
  else:
    run = lambda: speculative_generate(*arguments, rng=rng, **settings)
  start = time.perf_counter()
  output = jax.block_until_ready(run())
  seconds = time.perf_counter() - start
  return SpeculativeResult(output.tokens, decoding_statistics(
      output, gamma=gamma, cost_ratio=cost_ratio, seconds=seconds, new_tokens=max_new_tokens))
