"""Pure apply functions: what the train step sees instead of Flax modules.

    apply(variables, inputs, *, train, rng) -> (Output, new_model_state)

`variables` is `{'params': ..., **model_state}` (e.g. `batch_stats`); `new_model_state`
is the updated non-parameter collections in training mode and `{}` otherwise. Any function
with this signature (an NNX model wrapped by hand, a hand-written function) works the same.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax

from kdjax.models.output import Output

ApplyFn = Callable[..., Tuple[Output, Any]]


def apply_fn(module: nn.Module) -> ApplyFn:
  """Turns a linen module returning `Output` into a pure apply function.

  The module's `__call__` must take `(inputs, *, train: bool)`. Mutable collections (such as
  BatchNorm's `batch_stats`) are updated in training mode only; dropout draws from `rng`.
  """

  def apply(variables, inputs, *, train: bool, rng: Optional[jax.Array] = None):
    model_state_names = [name for name in variables if name != "params"]
    rngs = {"dropout": rng} if rng is not None else None
    if train and model_state_names:
      output, new_model_state = module.apply(
          variables, inputs, train=True, rngs=rngs, mutable=model_state_names)
      return output, dict(new_model_state)
    output = module.apply(variables, inputs, train=train, rngs=rngs)
    return output, {}

  apply.module = module  # For introspection (parameter counts, repr); the step never uses it.
  return apply


def init_variables(module: nn.Module, rng: jax.Array, sample_inputs) -> dict:
  """Initializes a module's variables from a sample batch (train=False shapes)."""
  return dict(module.init({"params": rng, "dropout": rng}, sample_inputs, train=False))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
