"""The train state: everything a run needs to continue exactly where it stopped."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Student training state. The teacher is not in here: its variables are a step argument.

  Attributes:
    step: scalar int32, optimizer steps taken.
    params: {'student': student params, 'method': the method's trainable params}.
    model_state: the student's non-parameter collections (e.g. {'batch_stats': ...}).
    method_state: the method's non-trainable state (memory banks, EMA teachers, ...).
    opt_state: optax state for `params`.
    rng: raw uint32 PRNG key; step `i` uses `fold_in(rng, i)`, so resuming is exact.
  """
  step: jax.Array
  params: Any
  model_state: Any
  method_state: Any
  opt_state: optax.OptState
  rng: jax.Array


def create(*, student_variables: dict, method_params: Any, method_state: Any,
           optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  params = {"student": student_variables["params"], "method": method_params}
  model_state = {k: v for k, v in student_variables.items() if k != "params"}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    method_state=method_state, opt_state=optimizer.init(params), rng=rng)


def student_variables(state: TrainState) -> dict:
  """The student's variables as its apply function takes them."""
  return {"params": state.params["student"], **state.model_state}
