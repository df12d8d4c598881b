"""ImageNet ResNets (torchvision resnet18/34/50) and RepDistiller's CIFAR ResNet-50.

torchvision (He et al. 2016, "v1.5": the stride of a Bottleneck sits on its 3x3 conv):
7x7/2 stem conv, BN, ReLU, 3x3/2 max pool, four stages of BasicBlocks (resnet18 [2, 2, 2, 2],
resnet34 [3, 4, 6, 3]) or Bottlenecks (resnet50 [3, 4, 6, 3], expansion 4) of widths
64, 128, 256, 512 with strides 1, 2, 2, 2, a global average pool and a linear head. Parameter
counts with 1000 classes (torchvision's documented numbers): resnet18 11,689,512, resnet34
21,797,672, resnet50 25,557,032.

`resnet50_cifar` is RepDistiller's `models/resnetv2.py` ResNet50: the same Bottleneck stages
behind a 3x3/1 stem conv with BN and ReLU and no max pool, for 32x32 inputs (23,705,252
parameters with 100 classes).

Inputs [B, 224, 224, 3] ('image224'; any size divisible by 32 works) or [B, 32, 32, 3] for
`resnet50_cifar`. Feature taps, for 224 inputs (resnet50_cifar: 32, 32, 16, 8, 4):
  'stem' [B, 56, 56, 64]: after the max pool (after the stem ReLU for resnet50_cifar);
  'stage1'..'stage4' [B, 56/28/14/7, 56/28/14/7, C] (C = 64..512, times 4 for Bottlenecks):
    post-ReLU stage outputs;
  'stage{k}_preact' (same shapes): the last block's residual sum before its final ReLU, which
    OFD (Heo et al. 2019) distils;
  'embedding' [B, 512 or 2048]: the average-pooled 'stage4'.
`BN_BEFORE_RELU[name]['stage{k}_preact']` names the BatchNorm whose scale and bias OFD's margin
reads: bn2 of the stage's last BasicBlock, bn3 of its last Bottleneck (`get_bn_before_relu` of
the OFD code, RepDistiller and mdistiller).

`TORCH_IMPORT` converts torchvision state_dicts (`conv1`, `bn1`, `layer{k}.{i}.conv1/bn1/...`,
`downsample.0/1`, `fc`) and RepDistiller's resnetv2 ones (same, with `shortcut.0/1`, `linear`).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.cifar_resnet import BasicBlock, batch_norm, conv, dense_init
from kdjax.models.output import Output


class Bottleneck(nn.Module):
  """1x1 - 3x3 (stride) - 1x1 convs, 4x expansion; returns `(relu(sum), sum)`."""
  planes: int
  stride: int = 1
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: batch_norm(name, train=train, axis_name=self.batch_norm_axis_name,
                                   dtype=self.dtype)
    out_features = 4 * self.planes
    y = nn.relu(norm("bn1")(conv(self.planes, 1, 1, "conv1", dtype=self.dtype)(x)))
    y = nn.relu(norm("bn2")(conv(self.planes, 3, self.stride, "conv2", dtype=self.dtype)(y)))
    y = norm("bn3")(conv(out_features, 1, 1, "conv3", dtype=self.dtype)(y))
    residual = x
    if self.stride != 1 or x.shape[-1] != out_features:
      residual = norm("shortcut_bn")(
          conv(out_features, 1, self.stride, "shortcut_conv", dtype=self.dtype)(x))
    preact = y + residual
    return nn.relu(preact), preact


class ResNet(nn.Module):
  """torchvision's ResNet (`imagenet_stem=True`) or RepDistiller's CIFAR variant.

  `widths` are the stages' inner widths (Bottlenecks output 4x); the stem has `widths[0]`.
  """
  blocks_per_stage: Sequence[int]
  bottleneck: bool
  imagenet_stem: bool = True
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    block_class = Bottleneck if self.bottleneck else BasicBlock
    if self.imagenet_stem:
      x = conv(self.widths[0], 7, 2, "stem_conv", dtype=self.dtype)(inputs)
    else:
      x = conv(self.widths[0], 3, 1, "stem_conv", dtype=self.dtype)(inputs)
    x = nn.relu(batch_norm("stem_bn", train=train, axis_name=self.batch_norm_axis_name,
                           dtype=self.dtype)(x))
    if self.imagenet_stem:
      # PyTorch pads a max pool with -inf on both sides, as Flax's explicit padding does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {"stem": x}
    for stage, (planes, blocks) in enumerate(zip(self.widths, self.blocks_per_stage),
                                             start=1):
      for block in range(blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x, preact = block_class(planes, stride, self.batch_norm_axis_name, self.dtype,
                                name=f"stage{stage}_block{block}")(x, train=train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    embedding = jnp.mean(x, axis=(1, 2))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


# name -> (blocks per stage, bottleneck, ImageNet stem, input kind, default classes).
_CONFIGS = {
    "resnet18": ((2, 2, 2, 2), False, True, "image224", 1000),
    "resnet34": ((3, 4, 6, 3), False, True, "image224", 1000),
    "resnet50": ((3, 4, 6, 3), True, True, "image224", 1000),
    "resnet50_cifar": ((3, 4, 6, 3), True, False, "image32", 100),
}


def _factory(name):
  blocks, bottleneck, imagenet_stem, _, default_classes = _CONFIGS[name]

  def build(num_classes: int = default_classes, **kwargs) -> ResNet:
    return ResNet(blocks_per_stage=blocks, bottleneck=bottleneck, imagenet_stem=imagenet_stem,
                  num_classes=num_classes, **kwargs)
  build.__doc__ = (f"{name}: {'Bottleneck' if bottleneck else 'BasicBlock'} stages {blocks} "
                   f"({'torchvision' if imagenet_stem else 'RepDistiller resnetv2'} definition).")
  return build


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet50_cifar = _factory("resnet50_cifar")

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {name: (globals()[name], config[3], True) for name, config in _CONFIGS.items()}

# name -> {pre-ReLU tap: Flax path of the BatchNorm OFD reads its margin from}.
BN_BEFORE_RELU = {
    name: {f"stage{stage}_preact": f"stage{stage}_block{blocks[stage - 1] - 1}/"
                                   f"{'bn3' if bottleneck else 'bn2'}" for stage in (1, 2, 3, 4)}
    for name, (blocks, bottleneck, *_) in _CONFIGS.items()}


def _convert(builder, *, name: str, shortcut: str, head: str) -> None:
  blocks, bottleneck, *_ = _CONFIGS[name]
  builder.conv("stem_conv", "conv1")
  builder.batch_norm("stem_bn", "bn1")
  for stage, count in enumerate(blocks, start=1):
    for block in range(count):
      flax, torch = f"stage{stage}_block{block}", f"layer{stage}.{block}"
      for layer in ("1", "2", "3") if bottleneck else ("1", "2"):
        builder.conv(f"{flax}/conv{layer}", f"{torch}.conv{layer}")
        builder.batch_norm(f"{flax}/bn{layer}", f"{torch}.bn{layer}")
      if f"{torch}.{shortcut}.0.weight" in builder.weights:
        builder.conv(f"{flax}/shortcut_conv", f"{torch}.{shortcut}.0")
        builder.batch_norm(f"{flax}/shortcut_bn", f"{torch}.{shortcut}.1")
  builder.dense("head", head)


# name -> converter of a torchvision (or, for resnet50_cifar, RepDistiller resnetv2) state_dict.
TORCH_IMPORT = {
    name: functools.partial(_convert, name=name,
                            shortcut="downsample" if name != "resnet50_cifar" else "shortcut",
                            head="fc" if name != "resnet50_cifar" else "linear")
    for name in _CONFIGS}
