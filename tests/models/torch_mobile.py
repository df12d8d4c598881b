"""PyTorch reference definitions of VGG, MobileNetV2/V1 and ShuffleNetV1/V2 (slow tests only).

Written for the tests from the anchors' architecture descriptions: RepDistiller `models/vgg.py`
(`vgg8_bn`, `vgg13_bn`), `models/mobilenetv2.py` (`mobile_half`), `models/ShuffleNetv1.py`
(`ShuffleV1`), `models/ShuffleNetv2.py` (`ShuffleV2`) and mdistiller
`mdistiller/models/imagenet/mobilenetv1.py`. Module and parameter NAMES follow the anchors
exactly (`block1.0.weight`, `blocks.2.1.conv.3.weight`, `layer1.0.conv5.weight`,
`model.3.4.running_var`, ...) so that their published `state_dict`s and these models' convert
with the same `TORCH_IMPORT` converters. `forward` returns `(logits, taps)`, taps
named and computed as kdjax's (NCHW), which the tests compare with kdjax's.

Imports torch: only the slow tests use this module.
"""

import torch
from torch import nn
import torch.nn.functional as F


def _conv_bn_relu(cin, cout, stride, kernel=3):
  # Indices 0, 1, 2 give the anchors' `<prefix>.0.weight` / `<prefix>.1.running_mean` names.
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ----------------------------------------------------------------------------------------- VGG
VGG_CONFIGS = {"vgg8": [[64], [128], [256], [512], [512]],
               "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


class VGG(nn.Module):
  """RepDistiller's BatchNorm VGG: blocks of conv(bias)-BN-ReLU, the last ReLU left out."""

  def __init__(self, config, num_classes):
    super().__init__()
    cin = 3
    for index, widths in enumerate(config):
      layers = []
      for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
      setattr(self, f"block{index}", nn.Sequential(*layers[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    height = x.shape[2]
    x = F.relu(self.block0(x))
    taps = {"stem": x}
    for k in range(1, 5):
      if k < 4 or height == 64:
        x = F.max_pool2d(x, 2, 2)
      x = getattr(self, f"block{k}")(x)
      taps[f"stage{k}_preact"] = x
      x = taps[f"stage{k}"] = F.relu(x)
    taps["embedding"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return self.classifier(taps["embedding"]), taps


# -------------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
  """pw-expand, depthwise, pw-linear (always all three, even for expansion 1)."""

  def __init__(self, cin, cout, stride, expansion):
    super().__init__()
    hidden = cin * expansion
    self.use_res_connect = stride == 1 and cin == cout
    self.conv = nn.Sequential(
        nn.Conv2d(cin, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2 (`mobilenetv2_T_w(T=6, W=0.5)` for `mobile_half`)."""

  def __init__(self, num_classes, expansion=6, width=0.5):
    super().__init__()
    setting = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2),
               (expansion, 64, 4, 2), (expansion, 96, 3, 1), (expansion, 160, 3, 2),
               (expansion, 320, 1, 1)]
    cin = int(32 * width)
    self.conv1 = _conv_bn_relu(3, cin, 2)
    self.blocks = nn.ModuleList()
    for t, c, n, s in setting:
      cout = int(c * width)
      layers = []
      for i in range(n):
        layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
        cin = cout
      self.blocks.append(nn.Sequential(*layers))
    last = int(1280 * width) if width > 1.0 else 1280
    self.conv2 = _conv_bn_relu(cin, last, 1, kernel=1)
    self.classifier = nn.Sequential(nn.Linear(last, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    taps = {"stem": x}
    for group, block in enumerate(self.blocks):
      x = block(x)
      if group in (1, 2, 4, 6):  # the anchor's f1..f4; linear bottlenecks, no ReLU
        stage = (1, 2, 4, 6).index(group) + 1
        taps[f"stage{stage}"] = taps[f"stage{stage}_preact"] = x
    x = self.conv2(x)
    # The anchor's AvgPool2d(input_size // 16, ceil_mode=True) for its 32x32 inputs.
    taps["embedding"] = torch.flatten(F.avg_pool2d(x, 32 // 16, ceil_mode=True), 1)
    return self.classifier(taps["embedding"]), taps


# -------------------------------------------------------------------------------- MobileNetV1
class MobileNetV1(nn.Module):
  """mdistiller's ImageNet MobileNetV1: `model.{0..13}` conv blocks, `model.14` the 7x7 pool."""

  WIDTHS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
            (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
            (512, 512, 1), (512, 1024, 2), (1024, 1024, 1)]

  def __init__(self, num_classes=1000):
    super().__init__()
    layers = [_conv_bn_relu(3, 32, 2)]
    for cin, cout, stride in self.WIDTHS:
      layers.append(nn.Sequential(
          nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
          nn.ReLU(), nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU()))
    layers.append(nn.AvgPool2d(7))
    self.model = nn.Sequential(*layers)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = self.model[0](x)
    taps = {"stem": x}
    for index in range(1, 14):
      x = self.model[index][:-1](x)  # the anchor's feat_k: the block without its last ReLU
      if index in (3, 5, 11, 13):
        stage = (3, 5, 11, 13).index(index) + 1
        taps[f"stage{stage}_preact"] = x
        taps[f"stage{stage}"] = F.relu(x)
      x = F.relu(x)
    taps["embedding"] = torch.flatten(self.model[14](x), 1)
    return self.fc(taps["embedding"]), taps


# ------------------------------------------------------------------------------- ShuffleNetV1
def _run_stages(model, x, taps):
  # Blocks return (output, pre-ReLU output); a stage's taps are its last block's.
  for stage in (1, 2, 3):
    for block in getattr(model, f"layer{stage}"):
      x, preact = block(x)
    taps[f"stage{stage}"], taps[f"stage{stage}_preact"] = x, preact
  return x


def channel_shuffle(x, groups):
  n, c, h, w = x.shape
  return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Bottleneck(nn.Module):

  def __init__(self, cin, cout, stride, groups):
    super().__init__()
    mid = int(cout / 4)
    self.first_groups = 1 if cin == 24 else groups
    self.stride = stride
    self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)

  def forward(self, x):
    out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    if self.stride == 2:  # AvgPool2d(3, 2, 1), count_include_pad=True (torch default).
      preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
    else:
      preact = out + x
    return F.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """RepDistiller's `ShuffleV1`: out planes (240, 480, 960), blocks (4, 8, 4), groups 3."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for index, (planes, blocks) in enumerate(zip((240, 480, 960), (4, 8, 4)), start=1):
      layers = []
      for i in range(blocks):
        layers.append(ShuffleV1Bottleneck(cin, planes - (cin if i == 0 else 0),
                                          2 if i == 0 else 1, 3))
        cin = planes
      setattr(self, f"layer{index}", nn.Sequential(*layers))
    self.linear = nn.Linear(960, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    taps = {"stem": x}
    x = _run_stages(self, x, taps)
    taps["embedding"] = torch.flatten(F.avg_pool2d(x, 4), 1)
    return self.linear(taps["embedding"]), taps


# ------------------------------------------------------------------------------- ShuffleNetV2
class ShuffleV2Basic(nn.Module):

  def __init__(self, channels):
    super().__init__()
    half = channels // 2
    self.conv1 = nn.Conv2d(half, half, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(half)
    self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
    self.bn2 = nn.BatchNorm2d(half)
    self.conv3 = nn.Conv2d(half, half, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(half)

  def forward(self, x):
    half = x.shape[1] // 2
    kept, branch = x[:, :half], x[:, half:]
    branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))
    branch = self.bn3(self.conv3(branch))
    preact = torch.cat([kept, branch], 1)  # the anchor returns it unshuffled
    return channel_shuffle(torch.cat([kept, F.relu(branch)], 1), 2), preact


class ShuffleV2Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return channel_shuffle(torch.cat([left, right], 1), 2), None


class ShuffleNetV2(nn.Module):
  """RepDistiller's `ShuffleV2` (net_size 1): channels (116, 232, 464, 1024), blocks (3, 7, 3)."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for index, (channels, blocks) in enumerate(zip((116, 232, 464), (3, 7, 3)), start=1):
      layers = [ShuffleV2Down(cin, channels)] + [ShuffleV2Basic(channels) for _ in range(blocks)]
      setattr(self, f"layer{index}", nn.Sequential(*layers))
      cin = channels
    self.conv2 = nn.Conv2d(464, 1024, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(1024)
    self.linear = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    taps = {"stem": x}
    x = F.relu(self.bn2(self.conv2(_run_stages(self, x, taps))))
    taps["embedding"] = torch.flatten(F.avg_pool2d(x, 4), 1)
    return self.linear(taps["embedding"]), taps


# kdjax model name -> (constructor(num_classes) -> torch model, input height/width).
TORCH_MODELS = {
    "vgg8": (lambda num_classes: VGG(VGG_CONFIGS["vgg8"], num_classes), 32),
    "vgg13": (lambda num_classes: VGG(VGG_CONFIGS["vgg13"], num_classes), 32),
    "mobilenetv2": (MobileNetV2, 32),
    "shufflenetv1": (ShuffleNetV1, 32),
    "shufflenetv2": (ShuffleNetV2, 32),
    "mobilenetv1": (MobileNetV1, 224),
}


def randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
  """Random BatchNorm affine parameters and running statistics (so eval mode tests them)."""
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        shape = module.running_mean.shape
        module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
        module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
