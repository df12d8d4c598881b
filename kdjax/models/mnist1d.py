"""MNIST-1D models (Greydanus 2020, "Scaling down deep learning").

Inputs are [B, 40] signals. Feature taps:
  MLP: 'hidden1', 'hidden2', ..., 'embedding' ([B, width]).
  CNN1D: 'stage1', 'stage2', 'stage3' ([B, L, C] maps), 'embedding' ([B, L*C] flattened).
No BatchNorm, so one step gives the same numbers however the batch is split over devices.
"""

from typing import Sequence

import flax.linen as nn

from kdjax.models.output import Output


class MLP(nn.Module):
  """Fully connected ReLU network (the paper's MLP baseline: 2 hidden layers of 100)."""
  num_classes: int = 10
  hidden_sizes: Sequence[int] = (100, 100)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    del train
    x = inputs.reshape(inputs.shape[0], -1)
    features = {}
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"dense{i + 1}")(x))
      features[f"hidden{i + 1}"] = x
    features["embedding"] = x
    logits = nn.Dense(self.num_classes, name="head")(x)
    return Output(logits, features)


class CNN1D(nn.Module):
  """1-D ConvNet (the paper's CNN: three conv layers, kernel 5, stride 2, ReLU; linear head)."""
  num_classes: int = 10
  channels: Sequence[int] = (25, 25, 25)
  kernel_size: int = 5

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    del train
    x = inputs.reshape(inputs.shape[0], -1, 1)  # [B, L, 1]
    features = {}
    for i, channels in enumerate(self.channels):
      x = nn.Conv(channels, (self.kernel_size,), strides=(2,), padding=[(1, 1)],
                  name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      features[f"stage{i + 1}"] = x
    embedding = x.reshape(x.shape[0], -1)
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, name="head")(embedding)
    return Output(logits, features)


def mlp(num_classes: int = 10, **kwargs) -> MLP:
  return MLP(num_classes=num_classes, **kwargs)


def cnn1d(num_classes: int = 10, **kwargs) -> CNN1D:
  return CNN1D(num_classes=num_classes, **kwargs)


def cnn1d_small(num_classes: int = 10, **kwargs) -> CNN1D:
  """A narrow student CNN (8 channels per layer)."""
  return CNN1D(num_classes=num_classes, channels=(8, 8, 8), **kwargs)


# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {
    "mlp": (mlp, "signal1d", False),
    "cnn1d": (cnn1d, "signal1d", False),
    "cnn1d_small": (cnn1d_small, "signal1d", False),
}
