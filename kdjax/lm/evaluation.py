"""What LLM people measure of a distilled language model, at the end of a run.

Per-token metrics (perplexity = exp(mean cross-entropy), teacher agreement) come from the eval
step like a classifier's; this module adds the decoding metrics, which need whole generations:

- speculative decoding of the teacher with the student as draft model (Leviathan et al. 2023;
  Chen et al. 2023), run for real on `lm.eval_prompts` eval prompts: the acceptance rate
  (accepted / proposed draft tokens), alpha (per-token acceptance probability), tokens per
  target forward and the speed-up that eq. 1 of Leviathan et al. implies with the measured
  draft/target cost ratio, greedy and sampled (temperature 1);
- the student's own generation speed (tokens/s, KV-cache greedy decoding, compiled first).

The programs are compiled, and the draft/target cost ratio measured, once per process for the
same architectures and shapes (`kdjax.lm.compiled`): a suite's rows reuse them.
"""

import time
from typing import Dict

import jax
import numpy as np

from kdjax.lm import compiled, speculative
from kdjax.lm.generate import generate_fn


def generation_metrics(*, student_apply, student_variables, teacher_apply, teacher_variables,
                       pipeline, lm_config, seed: int = 0) -> Dict[str, float]:
  """Speculative-decoding and generation-speed metrics (keys prefixed `spec_` / `generation_`).

  Args:
    student_apply / student_variables: the draft (the trained student), host arrays.
    teacher_apply / teacher_variables: the target; None for a run without teacher (then only
      the student's generation speed is measured).
    pipeline: an `LMInputPipeline` (eval prompts).
    lm_config: `config.lm` (eval_prompts, eval_prompt_length, eval_new_tokens,
      speculative_gamma).
  """
  prompts = pipeline.prompts("eval", lm_config.eval_prompts, lm_config.eval_prompt_length,
                             seed=seed)
  new_tokens, gamma = lm_config.eval_new_tokens, lm_config.speculative_gamma
  metrics = {}

  # Compiled ahead of time, so that each decoding runs once and its timing holds no compilation
  # (running it twice instead doubled the evaluation's cost); once per process for the same
  # architecture and shapes (`kdjax.lm.compiled`: a suite's rows share it).
  student_key = compiled.function_key(student_apply)
  generate = compiled.executable(
      ("generate", student_key, compiled.abstract_key((student_variables, prompts)), new_tokens),
      lambda: jax.jit(lambda variables, prompts: generate_fn(
          student_apply, variables, prompts, max_new_tokens=new_tokens, greedy=True).tokens
                      ).lower(student_variables, prompts))
  start = time.perf_counter()
  jax.block_until_ready(generate(student_variables, prompts))
  metrics["generation_tokens_per_sec"] = prompts.size // prompts.shape[1] * new_tokens / (
      time.perf_counter() - start)
  if teacher_apply is None:
    return metrics

  # A timing of the two architectures (not of their weights): measured once per process for
  # the same apply functions and shapes, so a suite's rows share the first row's measurement.
  buffer = np.zeros((prompts.shape[0], prompts.shape[1] + new_tokens + gamma), np.int32)
  cost_ratio = compiled.value(
      ("cost_ratio", compiled.function_key(teacher_apply), student_key,
       compiled.abstract_key((teacher_variables, student_variables, buffer))),
      lambda: speculative.measure_cost_ratio(teacher_apply, teacher_variables, student_apply,
                                             student_variables, buffer, repeats=3))
  metrics["spec_cost_ratio"] = cost_ratio
  for mode, sampling in (("greedy", dict(greedy=True)), ("sampled", dict(temperature=1.0))):
    statistics = speculative.speculative_decode(
        teacher_apply, teacher_variables, student_apply, student_variables, prompts,
        max_new_tokens=new_tokens, gamma=gamma, rng=jax.random.PRNGKey(seed),
        cost_ratio=cost_ratio, precompile=True, **sampling).statistics
    for key in ("acceptance_rate", "alpha", "tokens_per_round", "implied_speedup",
                "tokens_per_second"):
      metrics[f"spec_{mode}_{key}"] = float(statistics[key])
  return metrics
