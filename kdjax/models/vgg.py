"""CIFAR VGGs of RepDistiller (Simonyan & Zisserman 2015; Tian et al. 2020): vgg8, vgg13.

RepDistiller's `vgg8` / `vgg13` are its BatchNorm variants (`vgg8_bn`, `vgg13_bn`): five
blocks of 3x3 conv (with bias) - BatchNorm - ReLU, the last ReLU of each block taken outside the
block so that the pre-ReLU block output is a feature; 2x2 max pools after blocks 0, 1, 2 (and
after block 3 only for 64x64 inputs); global average pool; one linear layer, no FC stack.
Widths per block: vgg8 (64), (128), (256), (512), (512); vgg13 (64, 64), (128, 128),
(256, 256), (512, 512), (512, 512). Parameter counts with 100 classes (the PyTorch
`model.parameters()` count, checked against RepDistiller's definition): vgg8 3,965,028,
vgg13 9,462,180.

Inputs [B, 32, 32, 3]. Feature taps (RepDistiller's `is_feat=True` features):
  'stem'          [B, 32, 32, 64]   block 0 after its ReLU (f0)
  'stage1'        [B, 16, 16, 128]  block 1 after its ReLU (f1); 'stage1_preact' before it
  'stage2'        [B, 8, 8, 256]    block 2 (f2); 'stage2_preact'
  'stage3'        [B, 4, 4, 512]    block 3 (f3); 'stage3_preact'
  'stage4'        [B, 4, 4, 512]    block 4 (f4); 'stage4_preact'
  'embedding'     [B, 512]          global average pool of 'stage4' (f5)
`BN_BEFORE_RELU[name]['stage{k}_preact']` is the Flax path of the BatchNorm that produces the
pre-ReLU feature (mdistiller's `get_bn_before_relu`, used by OFD's margin).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.output import Output

# RepDistiller's `_initialize_weights`: conv N(0, sqrt(2 / (k*k*out))) (kaiming fan_out), zero
# bias; Linear N(0, 0.01), zero bias.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)

_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _check_image(model: str, inputs) -> None:
  if inputs.ndim != 4 or inputs.shape[-1] != 3:
    raise ValueError(f"{model}: inputs must be NHWC images [B, H, W, 3], got shape "
                     f"{tuple(inputs.shape)}.")


class VGG(nn.Module):
  """RepDistiller's BatchNorm VGG for CIFAR.

  Attributes:
    config: conv widths per block, five blocks.
    num_classes: logits width.
    batch_norm_axis_name: pmap axis for cross-device BatchNorm statistics (training only).
    dtype: computation dtype; logits are returned in float32.
  """
  config: Sequence[Sequence[int]] = _CONFIGS["vgg8"]
  num_classes: int = 100
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    _check_image("VGG", inputs)
    if len(self.config) != 5:
      raise ValueError(f"VGG config must have 5 blocks of conv widths, got {len(self.config)}.")
    height = inputs.shape[1]
    features = {}
    x = inputs
    for block, widths in enumerate(self.config):
      # pool0..pool2 always; pool3 only for 64x64 inputs, as in RepDistiller's forward.
      if block in (1, 2, 3) or (block == 4 and height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for index, width in enumerate(widths):
        if index:
          x = nn.relu(x)
        x = nn.Conv(width, (3, 3), padding=[(1, 1), (1, 1)], use_bias=True,
                    kernel_init=_conv_init, dtype=self.dtype,
                    name=f"block{block}_conv{index}")(x)
        x = nn.BatchNorm(  # torch momentum 0.1 == flax momentum 0.9
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            axis_name=self.batch_norm_axis_name if train else None,
            name=f"block{block}_bn{index}")(x)
      preact, x = x, nn.relu(x)
      if block == 0:
        features["stem"] = x
      else:
        features[f"stage{block}_preact"] = preact
        features[f"stage{block}"] = x
    embedding = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


def _factory(name):
  def build(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(config=_CONFIGS[name], num_classes=num_classes, **kwargs)
  build.__doc__ = (f"RepDistiller's CIFAR {name} (BatchNorm variant, conv bias), widths "
                   f"{_CONFIGS[name]}.")
  build.__name__ = name
  return build


vgg8 = _factory("vgg8")
vgg13 = _factory("vgg13")


def _bn_before_relu(name):
  # The last BatchNorm of blocks 1..4 (RepDistiller's `block{k}[-1]`).
  return {f"stage{k}_preact": f"block{k}_bn{len(_CONFIGS[name][k]) - 1}" for k in range(1, 5)}


# model name -> {pre-ReLU tap -> Flax path of the BatchNorm producing it}.
BN_BEFORE_RELU = {name: _bn_before_relu(name) for name in _CONFIGS}


def _converter(name):
  def convert(builder) -> None:
    # torch `block{b}` is Sequential(conv, bn, relu, conv, bn, ...): conv 3i, BatchNorm 3i+1.
    for block, widths in enumerate(_CONFIGS[name]):
      for index in range(len(widths)):
        builder.conv(f"block{block}_conv{index}", f"block{block}.{3 * index}")
        builder.batch_norm(f"block{block}_bn{index}", f"block{block}.{3 * index + 1}")
    builder.dense("head", "classifier")
  return convert


# name -> converter(VariablesBuilder) of RepDistiller's state_dict names; see `torch_import`.
TORCH_IMPORT = {name: _converter(name) for name in _CONFIGS}

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {"vgg8": (vgg8, "image32", True), "vgg13": (vgg13, "image32", True)}
