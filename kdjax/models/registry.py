"""Models by name: `get_model(name, num_classes=..., **kwargs)` returns a linen module.

Each model family module (`cifar_resnet`, `wrn`, ...) declares its own `MODELS` table of
`ModelEntry`s; this file only collects them, so adding a family touches one line here.
"""

from typing import Callable, Dict, NamedTuple

import flax.linen as nn

from kdjax.models import (cifar_resnet, imagenet_resnet, mnist1d, mobilenet, shufflenet, vgg, vit,
                          wrn)


class ModelEntry(NamedTuple):
  """A model family member: its factory and what it takes.

  Attributes:
    factory: `(num_classes=..., **kwargs) -> nn.Module`.
    input_kind: 'signal1d', 'image32' or 'image224'; checked against the dataset's.
    uses_batch_norm: the factory accepts `batch_norm_axis_name` (needed under pmap).
  """
  factory: Callable[..., nn.Module]
  input_kind: str = "image32"
  uses_batch_norm: bool = True


_FAMILIES = (mnist1d, cifar_resnet, wrn, vgg, mobilenet, shufflenet, imagenet_resnet, vit)

ENTRIES: Dict[str, ModelEntry] = {}
for _family in _FAMILIES:
  for _name, _entry in _family.MODELS.items():
    assert _name not in ENTRIES, f"model {_name!r} is defined twice"
    ENTRIES[_name] = ModelEntry(*_entry)

MODELS: Dict[str, Callable[..., nn.Module]] = {n: e.factory for n, e in ENTRIES.items()}

# Which models use BatchNorm and so accept `batch_norm_axis_name` (needed under pmap).
USES_BATCH_NORM = frozenset(n for n, e in ENTRIES.items() if e.uses_batch_norm)


def model_input_kind(name: str) -> str:
  return ENTRIES[name].input_kind


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, **kwargs)
