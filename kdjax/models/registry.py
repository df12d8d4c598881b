"""Models by name: `get_model(name, num_classes=..., **kwargs)` returns a linen module."""

from typing import Callable, Dict

import flax.linen as nn

from kdjax.models import cifar_resnet, mnist1d

# name -> (factory, input kind). Input kind lets config validation check model vs dataset.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": mnist1d.mlp,
    "cnn1d": mnist1d.cnn1d,
    "cnn1d_small": mnist1d.cnn1d_small,
    "resnet8": cifar_resnet.resnet8,
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
}

# The input each model takes, checked against the dataset's before training.
_INPUT_KINDS = {"mlp": "signal1d", "cnn1d": "signal1d", "cnn1d_small": "signal1d"}


def model_input_kind(name: str) -> str:
  return _INPUT_KINDS.get(name, "image32")


# Which models use BatchNorm and so accept `batch_norm_axis_name` (needed under pmap).
USES_BATCH_NORM = frozenset(n for n in MODELS if n.startswith("resnet"))


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, **kwargs)
