"""Built-in (and registered) models: input kind, parameter count and feature taps, from
`jax.eval_shape` of each model's init and apply (traced, never compiled or run)."""

import dataclasses
import re
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import catalog
from kdjax.models import registry

# A language model's sample: 16 token ids of the byte tokenizer's 259.
_TOKENS_SAMPLE = ((2, 16), jnp.int32, 259)


def sample_input(input_kind: str) -> Optional[tuple]:
  """(batch shape, dtype, num_classes) of a model taking `input_kind`: the first catalog
  dataset of that kind gives the shape and classes (MNIST-1D's 40 samples, CIFAR-100's 32x32,
  ...); None for a kind no dataset has (a user's own)."""
  if input_kind == "tokens":
    return _TOKENS_SAMPLE
  for spec in catalog.DATASETS.values():
    if spec.input_kind == input_kind:
      return (2,) + tuple(spec.input_shape), jnp.float32, spec.num_classes
  return None


@dataclasses.dataclass(frozen=True)
class ModelRow:
  name: str
  input_kind: str
  num_classes: int  # The classes the parameter count is for.
  parameters: Optional[int]  # None: the model is only built from a directory.
  taps: str  # Compressed: 'stage{1..3}, embedding'.
  builtin: bool


def compress_taps(names: Sequence[str]) -> str:
  """'block1', ..., 'block12' -> 'block{1..12}'; other names as they are, sorted."""
  groups, single = {}, []
  for name in names:
    match = re.fullmatch(r"(.*?)(\d+)(\D*)", name)
    if match:
      groups.setdefault((match.group(1), match.group(3)), []).append(int(match.group(2)))
    else:
      single.append(name)
  parts = []
  for (prefix, suffix), numbers in sorted(groups.items()):
    numbers = sorted(numbers)
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
      parts.append(f"{prefix}{{{numbers[0]}..{numbers[-1]}}}{suffix}")
    else:
      parts += [f"{prefix}{n}{suffix}" for n in numbers]
  return ", ".join(parts + sorted(single))


def model_row(name: str) -> ModelRow:
  input_kind = registry.model_input_kind(name)
  sample = sample_input(input_kind)
  if sample is None:  # A user's own input kind: no sample shape to trace with.
    return ModelRow(name, input_kind, 0, 0, "?", name in registry.BUILT_IN)
  shape, dtype, num_classes = sample
  fns = registry.get_model_fns(name, num_classes=num_classes)
  sample = jax.ShapeDtypeStruct(shape, dtype)
  try:
    variables = jax.eval_shape(fns.init, jax.random.key(0), sample)
  except ValueError as error:  # A model built from elsewhere (a pretrained directory).
    return ModelRow(name, input_kind, num_classes, None,
                    f"(not traceable alone: {str(error).split(': ')[0]})",
                    name in registry.BUILT_IN)
  parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  output, _ = jax.eval_shape(lambda v, x: fns.apply(v, x, train=False), variables, sample)
  return ModelRow(name, input_kind, num_classes, parameters, compress_taps(output.features),
                  name in registry.BUILT_IN)


def model_rows() -> List[ModelRow]:
  """Every model in the registry, in registry order (by family)."""
  return [model_row(name) for name in registry.MODELS]
