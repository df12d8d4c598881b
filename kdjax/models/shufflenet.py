"""ShuffleNetV1 and V2 for CIFAR, RepDistiller's `ShuffleV1` / `ShuffleV2` (Tian et al. 2020).

`shufflenetv1` (Zhang et al. 2018): a 1x1 stem of 24 channels (no downsampling), three stages
of bottlenecks (out planes 240, 480, 960; 4, 8, 4 blocks; 3 groups). A bottleneck is grouped
1x1 - BN - ReLU - channel shuffle - 3x3 depthwise - BN - ReLU - grouped 1x1 - BN, then
ReLU(out + x), or for the stride-2 first block of a stage ReLU(concat(out, AvgPool3x3/2(x)))
(the pool counts the zero padding, as torch's AvgPool2d does). The stem-facing 1x1 (24 input
channels) is not grouped. 949,258 parameters with 100 classes.

`shufflenetv2` (Ma et al. 2018), net size 1: 1x1 stem of 24 channels, three stages (116, 232,
464 channels) of one stride-2 down block and 3, 7, 3 basic blocks, a 1x1 conv to 1024 - BN -
ReLU, global pool. A basic block keeps the first half of the channels and runs the second
through 1x1 - BN - ReLU - 3x3 depthwise - BN - 1x1 - BN - ReLU; a down block concatenates a
depthwise-stride-2 branch and a 1x1 - depthwise-stride-2 - 1x1 branch. Both end in a channel
shuffle with 2 groups. 1,355,528 parameters with 100 classes.

Parameter counts are PyTorch's `model.parameters()`, checked against RepDistiller's
definitions. Channel shuffle: PyTorch's `[N, g, C/g, H, W] -> [N, C/g, g, H, W]` is done on the
last (channel) axis here, `[..., g, C/g] -> [..., C/g, g]`, so channel k of both layouts is the
same channel and converted weights line up.

Inputs [B, 32, 32, 3]. Feature taps (RepDistiller's `is_feat=True` features), v1 / v2:
  'stem'           [B, 32, 32, 24]          stem conv-BN-ReLU (f0)
  'stage1'         [B, 16, 16, 240 / 116]   last block of stage 1 (f1)
  'stage2'         [B, 8, 8, 480 / 232]     stage 2 (f2)
  'stage3'         [B, 4, 4, 960 / 464]     stage 3 (f3)
  'stage{k}_preact'                         the same shapes: RepDistiller's `preact=True`
      features. v1: `out + x` before the final ReLU of the stage's last block. v2: `concat(kept
      half, pre-ReLU branch)` of the last block, before its channel shuffle (RepDistiller
      returns it unshuffled, so its channel order differs from 'stage{k}').
  'embedding'      [B, 960 / 1024]          global average pool (f4); v2 after the 1x1 conv.
Neither model has a single BatchNorm producing its pre-ReLU features (the residual or the kept
half is added), and RepDistiller / mdistiller refuse it (NotImplementedError) in
`get_bn_before_relu`; so `BN_BEFORE_RELU` has no entries for them.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

# RepDistiller's ShuffleNets keep PyTorch's default initialisation: kaiming_uniform(a=sqrt(5))
# for convs and Linear weights, i.e. U(+-1/sqrt(fan_in)); Linear bias U(+-1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle on NHWC, in PyTorch's NCHW channel order.

  Args:
    x: [..., C] with C divisible by `groups`.
    groups: g.

  Returns:
    [..., C]: output channel `i * g + j` is input channel `j * (C // g) + i`.
  """
  channels = x.shape[-1]
  if channels % groups:
    raise ValueError(f"channel_shuffle: {channels} channels do not split into {groups} groups.")
  x = x.reshape(*x.shape[:-1], groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], channels)


def _check_image(model: str, inputs) -> None:
  if inputs.ndim != 4 or inputs.shape[-1] != 3:
    raise ValueError(f"{model}: inputs must be NHWC images [B, H, W, 3], got shape "
                     f"{tuple(inputs.shape)}.")


class _Layers:
  """Conv / BatchNorm constructors with one module's settings (torch padding, momentum)."""

  def __init__(self, module, train):
    self.module, self.train = module, train

  def conv(self, name, features, kernel=1, stride=1, groups=1):
    # Explicit torch padding k // 2: Flax 'SAME' pads stride-2 convs differently.
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, feature_group_count=groups,
                   use_bias=False, kernel_init=_torch_default, dtype=self.module.dtype,
                   name=name)

  def norm(self, name):
    return nn.BatchNorm(  # torch momentum 0.1 == flax momentum 0.9
        use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
        dtype=self.module.dtype,
        axis_name=self.module.batch_norm_axis_name if self.train else None, name=name)


class ShuffleV1Block(nn.Module):
  """ShuffleNetV1 bottleneck; returns (output, pre-ReLU output).

  Attributes:
    features: output channels of the last grouped 1x1 conv (the concatenated shortcut adds the
      input channels at stride 2).
    stride: 1 (residual sum) or 2 (concatenated 3x3 average-pool shortcut).
    groups: groups of the 1x1 convs; the first is ungrouped on the 24-channel stem.
  """
  features: int
  stride: int
  groups: int
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = _Layers(self, train)
    mid = self.features // 4
    first_groups = 1 if x.shape[-1] == 24 else self.groups  # RepDistiller's rule
    y = nn.relu(layers.norm("bn1")(layers.conv("conv1", mid, groups=first_groups)(x)))
    y = channel_shuffle(y, first_groups)
    y = layers.conv("conv2", mid, 3, self.stride, groups=mid)(y)
    y = nn.relu(layers.norm("bn2")(y))
    y = layers.norm("bn3")(layers.conv("conv3", self.features, groups=self.groups)(y))
    if self.stride == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)],
                             count_include_pad=True)
      preact = jnp.concatenate([y, shortcut.astype(y.dtype)], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """RepDistiller's `ShuffleV1`.

  Attributes:
    num_classes: logits width.
    out_planes: output channels of the three stages.
    num_blocks: blocks per stage (the first has stride 2).
    groups: groups of the 1x1 convs.
    batch_norm_axis_name: pmap axis for cross-device BatchNorm statistics (training only).
    dtype: computation dtype; logits are returned in float32.
  """
  num_classes: int = 100
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    _check_image("ShuffleNetV1", inputs)
    layers = _Layers(self, train)
    x = nn.relu(layers.norm("stem_bn")(layers.conv("stem_conv", 24)(inputs)))
    features = {"stem": x}
    for stage, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
      for block in range(blocks):
        # The first block concatenates its input, so its convs produce planes - input width.
        width = planes - x.shape[-1] if block == 0 else planes
        x, preact = ShuffleV1Block(width, 2 if block == 0 else 1, self.groups,
                                   self.batch_norm_axis_name, self.dtype,
                                   name=f"stage{stage}_block{block}")(x, train=train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    embedding = jnp.mean(x, axis=(1, 2))  # avg_pool2d(4) of the 4x4 map
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_torch_default,
                      bias_init=_torch_linear_bias(x.shape[-1]), dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


class ShuffleV2Block(nn.Module):
  """ShuffleNetV2 basic block (stride 1); returns (output, unshuffled pre-ReLU output)."""
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = _Layers(self, train)
    half = int(x.shape[-1] * 0.5)  # RepDistiller's SplitBlock(0.5)
    kept, branch = x[..., :half], x[..., half:]
    y = nn.relu(layers.norm("bn1")(layers.conv("conv1", half)(branch)))
    y = layers.norm("bn2")(layers.conv("conv2", half, 3, 1, groups=half)(y))
    y = layers.norm("bn3")(layers.conv("conv3", half)(y))
    preact = jnp.concatenate([kept, y], axis=-1)
    out = channel_shuffle(jnp.concatenate([kept, nn.relu(y)], axis=-1), 2)
    return out, preact


class ShuffleV2Down(nn.Module):
  """ShuffleNetV2 stride-2 block: two branches of `features // 2` channels, shuffled."""
  features: int
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = _Layers(self, train)
    channels, mid = x.shape[-1], self.features // 2
    left = layers.norm("bn1")(layers.conv("conv1", channels, 3, 2, groups=channels)(x))
    left = nn.relu(layers.norm("bn2")(layers.conv("conv2", mid)(left)))
    right = nn.relu(layers.norm("bn3")(layers.conv("conv3", mid)(x)))
    right = layers.norm("bn4")(layers.conv("conv4", mid, 3, 2, groups=mid)(right))
    right = nn.relu(layers.norm("bn5")(layers.conv("conv5", mid)(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """RepDistiller's `ShuffleV2` (net size 1).

  Attributes:
    num_classes: logits width.
    out_channels: channels of the three stages and of the last 1x1 conv.
    num_blocks: basic blocks per stage, after its down block.
    batch_norm_axis_name: pmap axis for cross-device BatchNorm statistics (training only).
    dtype: computation dtype; logits are returned in float32.
  """
  num_classes: int = 100
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    _check_image("ShuffleNetV2", inputs)
    layers = _Layers(self, train)
    x = nn.relu(layers.norm("stem_bn")(layers.conv("stem_conv", 24)(inputs)))
    features = {"stem": x}
    for stage, (channels, blocks) in enumerate(zip(self.out_channels, self.num_blocks),
                                               start=1):
      x = ShuffleV2Down(channels, self.batch_norm_axis_name, self.dtype,
                        name=f"stage{stage}_block0")(x, train=train)
      for block in range(1, blocks + 1):
        x, preact = ShuffleV2Block(self.batch_norm_axis_name, self.dtype,
                                   name=f"stage{stage}_block{block}")(x, train=train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    x = layers.conv("last_conv", self.out_channels[3])(x)
    x = nn.relu(layers.norm("last_bn")(x))
    embedding = jnp.mean(x, axis=(1, 2))  # avg_pool2d(4) of the 4x4 map
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_torch_default,
                      bias_init=_torch_linear_bias(x.shape[-1]), dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


def shufflenetv1(num_classes: int = 100, **kwargs) -> ShuffleNetV1:
  """RepDistiller's CIFAR `ShuffleV1`: out planes (240, 480, 960), blocks (4, 8, 4), 3 groups."""
  return ShuffleNetV1(num_classes=num_classes, **kwargs)


def shufflenetv2(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
  """RepDistiller's CIFAR `ShuffleV2`: channels (116, 232, 464, 1024), blocks (3, 7, 3)."""
  return ShuffleNetV2(num_classes=num_classes, **kwargs)


# No BatchNorm alone produces these models' pre-ReLU features (see the module docstring).
BN_BEFORE_RELU = {}


def _convert_shufflenetv1(builder) -> None:
  builder.conv("stem_conv", "conv1")
  builder.batch_norm("stem_bn", "bn1")
  for stage, blocks in enumerate((4, 8, 4), start=1):
    for block in range(blocks):
      for index in (1, 2, 3):
        builder.conv(f"stage{stage}_block{block}/conv{index}", f"layer{stage}.{block}.conv{index}")
        builder.batch_norm(f"stage{stage}_block{block}/bn{index}",
                           f"layer{stage}.{block}.bn{index}")
  builder.dense("head", "linear")


def _convert_shufflenetv2(builder) -> None:
  builder.conv("stem_conv", "conv1")
  builder.batch_norm("stem_bn", "bn1")
  for stage, blocks in enumerate((3, 7, 3), start=1):
    # torch `layer{stage}.0` is the down block (conv1..conv5), then the basic blocks (conv1..3).
    for block in range(blocks + 1):
      for index in range(1, 6 if block == 0 else 4):
        builder.conv(f"stage{stage}_block{block}/conv{index}", f"layer{stage}.{block}.conv{index}")
        builder.batch_norm(f"stage{stage}_block{block}/bn{index}",
                           f"layer{stage}.{block}.bn{index}")
  builder.conv("last_conv", "conv2")
  builder.batch_norm("last_bn", "bn2")
  builder.dense("head", "linear")


# name -> converter(VariablesBuilder) of RepDistiller's state_dict names; see `torch_import`.
TORCH_IMPORT = {"shufflenetv1": _convert_shufflenetv1, "shufflenetv2": _convert_shufflenetv2}

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {"shufflenetv1": (shufflenetv1, "image32", True),
          "shufflenetv2": (shufflenetv2, "image32", True)}
