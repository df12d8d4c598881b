"""MobileNetV2 for CIFAR (RepDistiller) and MobileNetV1 for ImageNet (mdistiller).

`mobilenetv2` is RepDistiller's `mobile_half` (Sandler et al. 2018, as used by Tian et al.
2020): `mobilenetv2_T_w(T=6, W=0.5)`, a 3x3 stride-2 stem of 16 channels, seven groups of
inverted residuals (expansion, channels, repeats, stride) = (1, 8, 1, 1), (6, 12, 2, 1),
(6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1); every block has
the 1x1 expansion conv, even with expansion 1. The last 1x1 conv is 1280 wide: RepDistiller
scales it only for widths above 1. 812,836 parameters with 100 classes (PyTorch
`model.parameters()`, checked against RepDistiller's definition).

Inputs [B, 32, 32, 3]. Feature taps (RepDistiller's `is_feat=True` features):
  'stem'          [B, 16, 16, 16]   stem conv-BN-ReLU (f0)
  'stage1'        [B, 16, 16, 12]   output of group 1 (f1)
  'stage2'        [B, 8, 8, 16]     group 2 (f2)
  'stage3'        [B, 4, 4, 48]     group 4 (f3)
  'stage4'        [B, 2, 2, 160]    group 6 (f4)
  'embedding'     [B, 1280]         average pool of the last conv-BN-ReLU (f5)
Inverted residuals end in a linear bottleneck, so the stage outputs are not post-ReLU: they are
themselves the pre-activation features (RepDistiller returns the same list for `preact=True`),
and 'stage{k}_preact' is the same array as 'stage{k}'. `BN_BEFORE_RELU` names the last
BatchNorm of the group (mdistiller's `get_bn_before_relu`); where the block has a residual
the feature is that BatchNorm's output plus the block input.

`mobilenetv1` is mdistiller's ImageNet MobileNetV1 (Howard et al. 2017; the student of its
ResNet-34 -> MobileNet table): a 3x3 stride-2 stem of 32 channels and 13 depthwise-separable
blocks (depthwise 3x3 - BN - ReLU - pointwise 1x1 - BN - ReLU), widths 64, 128, 128, 256, 256,
512 x 6, 1024, 1024, strides 2 at blocks 2, 4, 6, 12. 4,231,976 parameters with 1000 classes.

Inputs [B, 224, 224, 3]. Feature taps (mdistiller's `feats` / `preact_feats`):
  'stem'          [B, 112, 112, 32]  stem conv-BN-ReLU
  'stage1'        [B, 56, 56, 128]   block 3 after its last ReLU; 'stage1_preact' before it
  'stage2'        [B, 28, 28, 256]   block 5; 'stage2_preact'
  'stage3'        [B, 14, 14, 512]   block 11; 'stage3_preact'
  'stage4'        [B, 7, 7, 1024]    block 13; 'stage4_preact'
  'embedding'     [B, 1024]          average pool of 'stage4' (the anchor's AvgPool2d(7))
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

# RepDistiller's MobileNetV2 `_initialize_weights`: conv N(0, sqrt(2 / (k*k*out))), Linear
# N(0, 0.01) with zero bias.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_small_normal = nn.initializers.normal(0.01)
# mdistiller's MobileNetV1 keeps PyTorch's default initialisation: kaiming_uniform(a=sqrt(5))
# for convs and Linear weights, i.e. U(+-1/sqrt(fan_in)); Linear bias U(+-1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def _check_image(model: str, inputs) -> None:
  if inputs.ndim != 4 or inputs.shape[-1] != 3:
    raise ValueError(f"{model}: inputs must be NHWC images [B, H, W, 3], got shape "
                     f"{tuple(inputs.shape)}.")


class _Layers:
  """Conv / BatchNorm constructors with one module's settings (torch padding, momentum)."""

  def __init__(self, module, kernel_init):
    self.module, self.kernel_init = module, kernel_init

  def conv(self, features, kernel, stride, name, groups=1):
    # Explicit torch padding k // 2: Flax 'SAME' pads stride-2 convs differently.
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, feature_group_count=groups,
                   use_bias=False, kernel_init=self.kernel_init, dtype=self.module.dtype,
                   name=name)

  def norm(self, name, train):
    return nn.BatchNorm(  # torch momentum 0.1 == flax momentum 0.9
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.module.dtype,
        axis_name=self.module.batch_norm_axis_name if train else None, name=name)


class InvertedResidual(nn.Module):
  """1x1 expand - BN - ReLU - 3x3 depthwise - BN - ReLU - 1x1 project - BN (+ input)."""
  features: int
  stride: int
  expansion: int
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = _Layers(self, _kaiming_fan_out)
    hidden = x.shape[-1] * self.expansion
    y = nn.relu(layers.norm("expand_bn", train)(layers.conv(hidden, 1, 1, "expand_conv")(x)))
    y = layers.conv(hidden, 3, self.stride, "depthwise_conv", groups=hidden)(y)
    y = nn.relu(layers.norm("depthwise_bn", train)(y))
    y = layers.norm("project_bn", train)(layers.conv(self.features, 1, 1, "project_conv")(y))
    if self.stride == 1 and x.shape[-1] == self.features:
      return x + y
    return y


# (expansion or None for the model's, channels, repeats, stride), RepDistiller's table.
_V2_GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
              (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
_V2_STAGE_GROUPS = (1, 2, 4, 6)  # groups whose outputs are RepDistiller's f1..f4


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2 (`mobilenetv2_T_w`).

  Attributes:
    num_classes: logits width.
    expansion: T, the expansion of groups 1..6.
    width: W, the channel multiplier (`int(c * W)`); the last conv is `int(1280 * W)` wide for
      W > 1, else 1280.
    batch_norm_axis_name: pmap axis for cross-device BatchNorm statistics (training only).
    dtype: computation dtype; logits are returned in float32.
  """
  num_classes: int = 100
  expansion: int = 6
  width: float = 0.5
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    _check_image("MobileNetV2", inputs)
    layers = _Layers(self, _kaiming_fan_out)
    x = layers.conv(int(32 * self.width), 3, 2, "stem_conv")(inputs)
    x = nn.relu(layers.norm("stem_bn", train)(x))
    features = {"stem": x}
    for group, (expansion, channels, repeats, stride) in enumerate(_V2_GROUPS):
      for block in range(repeats):
        x = InvertedResidual(int(channels * self.width), stride if block == 0 else 1,
                             expansion or self.expansion, self.batch_norm_axis_name,
                             self.dtype, name=f"group{group}_block{block}")(x, train=train)
      if group in _V2_STAGE_GROUPS:
        stage = _V2_STAGE_GROUPS.index(group) + 1
        features[f"stage{stage}"] = x
        features[f"stage{stage}_preact"] = x  # linear bottleneck: no ReLU after the block
    last = int(1280 * self.width) if self.width > 1.0 else 1280
    x = nn.relu(layers.norm("last_bn", train)(layers.conv(last, 1, 1, "last_conv")(x)))
    # RepDistiller's AvgPool2d(input_size // 16, ceil_mode=True) covers the whole 2x2 map of
    # a 32x32 input: a global mean.
    embedding = jnp.mean(x, axis=(1, 2))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_small_normal, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


# (output channels, stride) of mdistiller's blocks model.1 .. model.13.
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
              (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
_V1_STAGE_BLOCKS = (3, 5, 11, 13)  # blocks whose outputs are mdistiller's feat1..feat4


class MobileNetV1(nn.Module):
  """mdistiller's ImageNet MobileNetV1.

  Attributes:
    num_classes: logits width (mdistiller fixes 1000).
    blocks: (output channels, stride) of the depthwise-separable blocks.
    batch_norm_axis_name: pmap axis for cross-device BatchNorm statistics (training only).
    dtype: computation dtype; logits are returned in float32.
  """
  num_classes: int = 1000
  blocks: Sequence[Tuple[int, int]] = _V1_BLOCKS
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    _check_image("MobileNetV1", inputs)
    layers = _Layers(self, _torch_default)
    x = nn.relu(layers.norm("stem_bn", train)(layers.conv(32, 3, 2, "stem_conv")(inputs)))
    features = {"stem": x}
    for index, (channels, stride) in enumerate(self.blocks, start=1):
      x = _SeparableBlock(channels, stride, self.batch_norm_axis_name, self.dtype,
                          name=f"block{index}")(x, train=train)
      preact, x = x, nn.relu(x)
      if index in _V1_STAGE_BLOCKS:
        stage = _V1_STAGE_BLOCKS.index(index) + 1
        features[f"stage{stage}_preact"] = preact
        features[f"stage{stage}"] = x
    embedding = jnp.mean(x, axis=(1, 2))  # AvgPool2d(7) on the 7x7 map of a 224x224 input
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_torch_default,
                      bias_init=_torch_linear_bias(x.shape[-1]), dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


class _SeparableBlock(nn.Module):
  """3x3 depthwise - BN - ReLU - 1x1 pointwise - BN; returns the pre-ReLU output."""
  features: int
  stride: int
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = _Layers(self, _torch_default)
    channels = x.shape[-1]
    x = layers.conv(channels, 3, self.stride, "depthwise_conv", groups=channels)(x)
    x = nn.relu(layers.norm("depthwise_bn", train)(x))
    return layers.norm("pointwise_bn", train)(layers.conv(self.features, 1, 1,
                                                          "pointwise_conv")(x))


def mobilenetv2(num_classes: int = 100, **kwargs) -> MobileNetV2:
  """RepDistiller's `mobile_half`: MobileNetV2 with expansion 6, width 0.5, for CIFAR."""
  return MobileNetV2(num_classes=num_classes, **kwargs)


def mobilenetv1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
  """mdistiller's ImageNet MobileNetV1 (224x224 inputs)."""
  return MobileNetV1(num_classes=num_classes, **kwargs)


# model name -> {pre-ReLU tap -> Flax path of the BatchNorm producing it}, mdistiller's
# `get_bn_before_relu`: MobileNetV2 `blocks[g][-1].conv[-1]`, MobileNetV1 `model[b][-2]`.
BN_BEFORE_RELU = {
    "mobilenetv2": {
        f"stage{stage}_preact": f"group{group}_block{_V2_GROUPS[group][2] - 1}/project_bn"
        for stage, group in enumerate(_V2_STAGE_GROUPS, start=1)},
    "mobilenetv1": {f"stage{stage}_preact": f"block{block}/pointwise_bn"
                    for stage, block in enumerate(_V1_STAGE_BLOCKS, start=1)},
}


def _convert_mobilenetv2(builder) -> None:
  builder.conv("stem_conv", "conv1.0")
  builder.batch_norm("stem_bn", "conv1.1")
  for group, (_, _, repeats, _) in enumerate(_V2_GROUPS):
    for block in range(repeats):
      # torch `conv` Sequential: conv 0, bn 1, relu 2, conv 3, bn 4, relu 5, conv 6, bn 7.
      flax, torch = f"group{group}_block{block}", f"blocks.{group}.{block}.conv"
      for index, layer in enumerate(("expand", "depthwise", "project")):
        builder.conv(f"{flax}/{layer}_conv", f"{torch}.{3 * index}")
        builder.batch_norm(f"{flax}/{layer}_bn", f"{torch}.{3 * index + 1}")
  builder.conv("last_conv", "conv2.0")
  builder.batch_norm("last_bn", "conv2.1")
  builder.dense("head", "classifier.0")


def _convert_mobilenetv1(builder) -> None:
  builder.conv("stem_conv", "model.0.0")
  builder.batch_norm("stem_bn", "model.0.1")
  for block in range(1, len(_V1_BLOCKS) + 1):
    # torch `model.{block}`: depthwise conv 0, bn 1, relu 2, pointwise conv 3, bn 4, relu 5.
    builder.conv(f"block{block}/depthwise_conv", f"model.{block}.0")
    builder.batch_norm(f"block{block}/depthwise_bn", f"model.{block}.1")
    builder.conv(f"block{block}/pointwise_conv", f"model.{block}.3")
    builder.batch_norm(f"block{block}/pointwise_bn", f"model.{block}.4")
  builder.dense("head", "fc")


# name -> converter(VariablesBuilder) of the anchors' state_dict names; see `torch_import`.
TORCH_IMPORT = {"mobilenetv2": _convert_mobilenetv2, "mobilenetv1": _convert_mobilenetv1}

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {"mobilenetv2": (mobilenetv2, "image32", True),
          "mobilenetv1": (mobilenetv1, "image224", True)}
