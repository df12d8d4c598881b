"""CIFAR ResNets of RepDistiller / mdistiller (Tian et al. 2020; Zhao et al. 2022).

`resnet{depth}` (depth 8, 14, 20, 32, 44, 56, 110) has filters (16, 16, 32, 64); the `x4`
variants (resnet8x4, resnet32x4) have (32, 64, 128, 256). Each of the three stages has
(depth - 2) // 6 BasicBlocks; strides 1, 2, 2; global 8x8 average pool; linear head.
Parameter counts with 100 classes: resnet8 83,892, resnet20 278,324, resnet32 472,756,
resnet56 861,620, resnet110 1,736,564, resnet8x4 1,233,540, resnet32x4 7,433,860 (the PyTorch
`model.parameters()` count; BatchNorm running statistics are not parameters).

Inputs [B, 32, 32, 3]. Feature taps: 'stem' [B, 32, 32, f0], 'stage1' [B, 32, 32, f1],
'stage2' [B, 16, 16, f2], 'stage3' [B, 8, 8, f3] (post-ReLU block outputs), 'embedding' [B, f3],
and 'stage{k}_preact' (same shapes as 'stage{k}'): the last block's residual sum before its
final ReLU, RepDistiller's `preact=True` features, which OFD (Heo et al. 2019) distils.
`BN_BEFORE_RELU[name]['stage{k}_preact']` names the BatchNorm whose scale and bias OFD's margin
reads for that tap: bn2 of the stage's last block (RepDistiller's `get_bn_before_relu`).

`TORCH_IMPORT` converts RepDistiller's `models/resnet.py` state_dicts (`conv1`, `bn1`,
`layer{k}.{i}.conv1/bn1/conv2/bn2/downsample.0/downsample.1`, `fc`).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.output import Output

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal fan_out
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch Linear


def batch_norm(name: str, *, train: bool, axis_name: Optional[str], dtype: Any) -> nn.BatchNorm:
  """PyTorch's BatchNorm2d defaults in Flax terms (torch momentum 0.1 == flax momentum 0.9)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      axis_name=axis_name if train else None, name=name)


def conv(features: int, kernel: int, stride: int, name: str, *, dtype: Any) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric `padding=kernel // 2`.

  Flax's 'SAME' pads (0, 1) where PyTorch pads (1, 1) for a stride-2 3x3 conv on an even input,
  which shifts every window by one pixel and breaks imported weights.
  """
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; returns `(relu(sum), sum)`, the sum being OFD's tap."""
  planes: int
  stride: int = 1
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: batch_norm(name, train=train, axis_name=self.batch_norm_axis_name,
                                   dtype=self.dtype)
    residual = x
    y = nn.relu(norm("bn1")(conv(self.planes, 3, self.stride, "conv1", dtype=self.dtype)(x)))
    y = norm("bn2")(conv(self.planes, 3, 1, "conv2", dtype=self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != self.planes:
      residual = norm("shortcut_bn")(
          conv(self.planes, 1, self.stride, "shortcut_conv", dtype=self.dtype)(x))
    preact = y + residual
    return nn.relu(preact), preact


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
    x = conv(self.filters[0], 3, 1, "stem_conv", dtype=self.dtype)(inputs)
    x = batch_norm("stem_bn", train=train, axis_name=self.batch_norm_axis_name,
                   dtype=self.dtype)(x)
    x = nn.relu(x)
    features = {"stem": x}
    for stage, (planes, stride) in enumerate(zip(self.filters[1:], (1, 2, 2)), start=1):
      for block in range(blocks_per_stage):
        x, preact = BasicBlock(planes, stride if block == 0 else 1, self.batch_norm_axis_name,
                               self.dtype, name=f"stage{stage}_block{block}")(x, train=train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    embedding = jnp.mean(x, axis=(1, 2))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


_CONFIGS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _factory(depth, filters):
  def build(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, filters=filters, num_classes=num_classes, **kwargs)
  build.__doc__ = f"CIFAR ResNet-{depth}, filters {filters} (RepDistiller definition)."
  return build


resnet8 = _factory(*_CONFIGS["resnet8"])
resnet14 = _factory(*_CONFIGS["resnet14"])
resnet20 = _factory(*_CONFIGS["resnet20"])
resnet32 = _factory(*_CONFIGS["resnet32"])
resnet44 = _factory(*_CONFIGS["resnet44"])
resnet56 = _factory(*_CONFIGS["resnet56"])
resnet110 = _factory(*_CONFIGS["resnet110"])
resnet8x4 = _factory(*_CONFIGS["resnet8x4"])
resnet32x4 = _factory(*_CONFIGS["resnet32x4"])


# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {name: (globals()[name], "image32", True) for name in _CONFIGS}

# name -> {pre-ReLU tap: Flax path of the BatchNorm OFD reads its margin from}.
BN_BEFORE_RELU = {
    name: {f"stage{stage}_preact": f"stage{stage}_block{(depth - 2) // 6 - 1}/bn2"
           for stage in (1, 2, 3)}
    for name, (depth, _) in _CONFIGS.items()}


def _converter(depth):
  def convert(builder) -> None:
    builder.conv("stem_conv", "conv1")
    builder.batch_norm("stem_bn", "bn1")
    for stage in (1, 2, 3):
      for block in range((depth - 2) // 6):
        flax, torch = f"stage{stage}_block{block}", f"layer{stage}.{block}"
        for layer in ("1", "2"):
          builder.conv(f"{flax}/conv{layer}", f"{torch}.conv{layer}")
          builder.batch_norm(f"{flax}/bn{layer}", f"{torch}.bn{layer}")
        if f"{torch}.downsample.0.weight" in builder.weights:
          builder.conv(f"{flax}/shortcut_conv", f"{torch}.downsample.0")
          builder.batch_norm(f"{flax}/shortcut_bn", f"{torch}.downsample.1")
    builder.dense("head", "fc")
  return convert


# name -> converter of a RepDistiller `models/resnet.py` state_dict; see `torch_import`.
TORCH_IMPORT = {name: _converter(depth) for name, (depth, _) in _CONFIGS.items()}
