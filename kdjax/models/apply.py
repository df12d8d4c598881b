"""Pure apply functions: what the train step sees instead of Flax modules.

    apply(variables, inputs, *, train, rng) -> (Output, new_model_state)

`variables` is `{'params': ..., **model_state}` (e.g. `batch_stats`); `new_model_state`
is the updated non-parameter collections in training mode and `{}` otherwise. NNX models and
hand-written functions get the same signature from `kdjax.models.adapters`.
"""

from typing import Any, Callable, Tuple

import flax.linen as nn
import jax

from kdjax.models import adapters
from kdjax.models.output import Output

ApplyFn = Callable[..., Tuple[Output, Any]]


def apply_fn(module: nn.Module) -> ApplyFn:
  """Turns a linen module returning `Output` (or logits) into a pure apply function.

  The module's `__call__` must take `(inputs, *, train: bool)`. Mutable collections (such as
  BatchNorm's `batch_stats`) are updated in training mode only; dropout draws from `rng`;
  values sown into 'intermediates' become feature taps (`kdjax.models.adapters`).
  """
  return adapters.linen_apply(module)


def init_variables(module: nn.Module, rng: jax.Array, sample_inputs) -> dict:
  """Initializes a module's variables from a sample batch (train=False shapes)."""
  return adapters.linen_init(module, rng, sample_inputs)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
