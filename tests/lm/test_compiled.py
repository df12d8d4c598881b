"""Decoding programs compiled once per process (`kdjax.lm.compiled`): equal apply functions share
an executable, different ones do not, and a shared executable computes with the weights given."""

import jax
import numpy as np

from kdjax import models as models_lib
from kdjax.lm import compiled, speculative
from kdjax.models import precision

T = 16


def _model(name="lm_tiny", seed=0, **kwargs):
  fns = models_lib.get_model_fns(name, num_classes=259, **kwargs)
  return fns.apply, jax.device_get(fns.init(jax.random.PRNGKey(seed),
                                            np.zeros((2, T), np.int32)))


def test_function_keys_name_the_program():
  first, _ = _model()
  second, _ = _model()
  assert first is not second and compiled.function_key(first) == compiled.function_key(second)
  assert compiled.function_key(first) != compiled.function_key(_model("lm_student")[0])
  # The wrapper's compute dtype is part of the program.
  bf16 = precision.mixed_precision(first, "bfloat16")
  assert compiled.function_key(bf16) != compiled.function_key(first)
  assert compiled.function_key(bf16) == compiled.function_key(
      precision.mixed_precision(second, "bfloat16"))
  assert compiled.function_key(lambda x: x) != compiled.function_key(lambda x: x + 1)


def test_precompiled_speculative_decoding_is_shared_and_uses_the_given_weights():
  """A second row (new apply functions, other draft weights) reuses the executable, and its
  output is what an uncompiled call with its own weights gives."""
  compiled.clear()
  target, target_variables = _model(seed=1)
  prompts = np.arange(2 * 4, dtype=np.int32).reshape(2, 4) % 200 + 3
  settings = dict(max_new_tokens=6, gamma=2, rng=jax.random.PRNGKey(0), temperature=1.0)
  draft, draft_variables = _model(seed=2)
  speculative.speculative_decode(target, target_variables, draft, draft_variables, prompts,
                                 precompile=True, **settings)
  assert len(compiled._EXECUTABLES) == 1
  other_target, _ = _model(seed=1)
  other_draft, other_variables = _model(seed=3)
  shared = speculative.speculative_decode(other_target, target_variables, other_draft,
                                          other_variables, prompts, precompile=True, **settings)
  assert len(compiled._EXECUTABLES) == 1  # Not lowered and compiled again.
  fresh = speculative.speculative_decode(other_target, target_variables, other_draft,
                                         other_variables, prompts, **settings)
  np.testing.assert_array_equal(shared.tokens, fresh.tokens)
  assert shared.statistics["accepted"] == fresh.statistics["accepted"]
  compiled.clear()


def test_values_are_measured_once_per_key():
  compiled.clear()
  calls = []
  assert compiled.value("k", lambda: calls.append(1) or 0.25) == 0.25
  assert compiled.value("k", lambda: calls.append(1) or 0.5) == 0.25
  assert compiled.value("other", lambda: 0.5) == 0.5 and len(calls) == 1
  compiled.clear()
