"""CIFAR ResNets of RepDistiller / mdistiller (Tian et al. 2020; Zhao et al. 2022).

`resnet{depth}` has filters (16, 16, 32, 64); the `x4` variants (32, 64, 128, 256). Each of the
three stages has (depth - 2) // 6 BasicBlocks; strides 1, 2, 2; global 8x8 average pool; linear
head. Parameter counts with 100 classes: resnet8x4 1,233,540, resnet32x4 7,433,860 (the
PyTorch `model.parameters()` count; BatchNorm running statistics are not parameters).

Inputs [B, 32, 32, 3]. Feature taps: 'stem' [B, 32, 32, f0], 'stage1' [B, 32, 32, f1],
'stage2' [B, 16, 16, f2], 'stage3' [B, 8, 8, f3] (post-ReLU block outputs), 'embedding' [B, f3].
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.output import Output

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal fan_out
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch Linear


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: nn.BatchNorm(  # torch momentum 0.1 == flax momentum 0.9
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
        axis_name=self.batch_norm_axis_name if train else None, name=name)
    conv = lambda features, kernel, stride, name: nn.Conv(
        features, (kernel, kernel), strides=(stride, stride),
        padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, kernel_init=_conv_init,
        dtype=self.dtype, name=name)
    residual = x
    y = nn.relu(norm("bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
    y = norm("bn2")(conv(self.planes, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.planes:
      residual = norm("shortcut_bn")(conv(self.planes, 1, self.stride, "shortcut_conv")(x))
    return nn.relu(y + residual)


class CifarResNet(nn.Module):
  depth: int
  filters: Sequence[int] = (16, 16, 32, 64)
  num_classes: int = 100
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    if (self.depth - 2) % 6:
      raise ValueError(f"CifarResNet depth must be 6n+2, got {self.depth}.")
    blocks_per_stage = (self.depth - 2) // 6
    x = nn.Conv(self.filters[0], (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, name="stem_conv")(inputs)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, axis_name=self.batch_norm_axis_name if train else None,
                     name="stem_bn")(x)
    x = nn.relu(x)
    features = {"stem": x}
    for stage, (planes, stride) in enumerate(zip(self.filters[1:], (1, 2, 2)), start=1):
      for block in range(blocks_per_stage):
        x = BasicBlock(planes, stride if block == 0 else 1, self.batch_norm_axis_name,
                       self.dtype, name=f"stage{stage}_block{block}")(x, train=train)
      features[f"stage{stage}"] = x
    embedding = jnp.mean(x, axis=(1, 2))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


def _factory(depth, filters):
  def build(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, filters=filters, num_classes=num_classes, **kwargs)
  build.__doc__ = f"CIFAR ResNet-{depth}, filters {filters} (RepDistiller definition)."
  return build


resnet8 = _factory(8, (16, 16, 32, 64))
resnet20 = _factory(20, (16, 16, 32, 64))
resnet32 = _factory(32, (16, 16, 32, 64))
resnet56 = _factory(56, (16, 16, 32, 64))
resnet110 = _factory(110, (16, 16, 32, 64))
resnet8x4 = _factory(8, (32, 64, 128, 256))
resnet32x4 = _factory(32, (32, 64, 128, 256))


# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {name: (globals()[name], "image32", True) for name in (
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4")}
