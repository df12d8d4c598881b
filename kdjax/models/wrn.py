"""Wide ResNets of RepDistiller (wrn_16_2, wrn_40_1, wrn_40_2; Zagoruyko & Komodakis 2016).

`wrn_{depth}_{k}`: a 3x3 stem conv to 16 channels, three groups of (depth - 4) // 6
pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of widths 16k, 32k, 64k with strides
1, 2, 2, a final BN-ReLU, a global 8x8 average pool and a linear head; dropout 0, as
RepDistiller's `models/wrn.py` (Wei Yang's definition). Its quirk is kept: a block whose input
and output widths differ adds the shortcut conv of the *activated* input, a block of equal
widths adds its *raw* input. Parameter counts with 100 classes: wrn_16_2 703,284, wrn_40_1
569,780, wrn_40_2 2,255,156 (PyTorch `model.parameters()`).

Inputs [B, 32, 32, 3]. Feature taps, as RepDistiller's `is_feat` features:
  'stem' [B, 32, 32, 16]: the stem conv output (no BN/ReLU in a pre-activation net);
  'stage1' [B, 32, 32, 16k], 'stage2' [B, 16, 16, 32k], 'stage3' [B, 8, 8, 64k]: each group's
    output, the raw residual sum (a pre-activation block ends without a ReLU; RepDistiller's
    FitNet/AT numbers on WRNs use exactly these);
  'stage{k}_preact' (same shapes): that output after the BatchNorm that the next layer applies
    before its ReLU, i.e. bn1 of the next group's first block for k = 1, 2 and the final BN
    for k = 3, as RepDistiller's `preact=True` and the OFD official code
    (clovaai/overhaul-distillation, CIFAR-100 `WideResNet.extract_feature(preReLU=True)`);
    `relu(stage{k}_preact)` is what the next conv sees;
  'embedding' [B, 64k]: the pooled relu(final BN).
`BN_BEFORE_RELU[name]['stage{k}_preact']` names that same BatchNorm (OFD's margin reads its
scale and bias; `get_bn_before_relu` in RepDistiller, mdistiller and the OFD code).

`TORCH_IMPORT` converts RepDistiller state_dicts (`conv1`, `block{k}.layer.{i}.bn1/conv1/bn2/
conv2/convShortcut`, `bn1`, `fc`).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.cifar_resnet import batch_norm, conv, dense_init
from kdjax.models.output import Output


class WideBlock(nn.Module):
  """A pre-activation wide block; returns `(output, bn1(input))`, the latter pre-ReLU."""
  planes: int
  stride: int = 1
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda name: batch_norm(name, train=train, axis_name=self.batch_norm_axis_name,
                                   dtype=self.dtype)
    normalized = norm("bn1")(x)
    activated = nn.relu(normalized)
    y = conv(self.planes, 3, self.stride, "conv1", dtype=self.dtype)(activated)
    y = conv(self.planes, 3, 1, "conv2", dtype=self.dtype)(nn.relu(norm("bn2")(y)))
    if x.shape[-1] == self.planes:
      # RepDistiller adds the raw input here (and would ignore a stride, never used with it).
      residual = x
    else:
      residual = conv(self.planes, 1, self.stride, "shortcut_conv", dtype=self.dtype)(activated)
    return y + residual, normalized


class WideResNet(nn.Module):
  depth: int
  widen_factor: int
  num_classes: int = 100
  batch_norm_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}.")
    blocks_per_stage = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = conv(16, 3, 1, "stem_conv", dtype=self.dtype)(inputs)
    features = {"stem": x}
    for stage, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      for block in range(blocks_per_stage):
        x, normalized_input = WideBlock(
            planes, stride if block == 0 else 1, self.batch_norm_axis_name, self.dtype,
            name=f"stage{stage}_block{block}")(x, train=train)
        if stage > 1 and block == 0:  # This block's bn1 is the previous stage's BN-before-ReLU.
          features[f"stage{stage - 1}_preact"] = normalized_input
      features[f"stage{stage}"] = x
    x = batch_norm("final_bn", train=train, axis_name=self.batch_norm_axis_name,
                   dtype=self.dtype)(x)
    features["stage3_preact"] = x
    embedding = jnp.mean(nn.relu(x), axis=(1, 2))
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


_CONFIGS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def _factory(depth, widen_factor):
  def build(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes, **kwargs)
  build.__doc__ = f"WRN-{depth}-{widen_factor} (RepDistiller definition, dropout 0)."
  return build


wrn_16_1 = _factory(*_CONFIGS["wrn_16_1"])
wrn_16_2 = _factory(*_CONFIGS["wrn_16_2"])
wrn_40_1 = _factory(*_CONFIGS["wrn_40_1"])
wrn_40_2 = _factory(*_CONFIGS["wrn_40_2"])

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {name: (globals()[name], "image32", True) for name in _CONFIGS}

# name -> {pre-ReLU tap: Flax path of the BatchNorm OFD reads its margin from}.
BN_BEFORE_RELU = {name: {"stage1_preact": "stage2_block0/bn1",
                         "stage2_preact": "stage3_block0/bn1",
                         "stage3_preact": "final_bn"} for name in _CONFIGS}


def _converter(depth):
  def convert(builder) -> None:
    builder.conv("stem_conv", "conv1")
    for stage in (1, 2, 3):
      for block in range((depth - 4) // 6):
        flax, torch = f"stage{stage}_block{block}", f"block{stage}.layer.{block}"
        for layer in ("1", "2"):
          builder.batch_norm(f"{flax}/bn{layer}", f"{torch}.bn{layer}")
          builder.conv(f"{flax}/conv{layer}", f"{torch}.conv{layer}")
        if f"{torch}.convShortcut.weight" in builder.weights:
          builder.conv(f"{flax}/shortcut_conv", f"{torch}.convShortcut")
    builder.batch_norm("final_bn", "bn1")
    builder.dense("head", "fc")
  return convert


# name -> converter of a RepDistiller `models/wrn.py` state_dict; see `torch_import`.
TORCH_IMPORT = {name: _converter(depth) for name, (depth, _) in _CONFIGS.items()}
