"""PyTorch reference definitions of the ResNet families, with the anchors' module names.

Written for kdjax's tests from the published architectures, with the module and parameter
names of RepDistiller (`models/resnet.py`, `models/wrn.py`, `models/resnetv2.py`) and
torchvision (`resnet18/34/50`), so that their real `.pth` state_dicts and these models'
state_dicts have the same keys. Only the forward pass to logits is defined (eval-mode logits
are what the import tests compare). Imports torch: used by slow tests only.
"""

import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(in_planes, planes, stride=1):
  return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  """RepDistiller's and torchvision's BasicBlock; `shortcut_name` is `downsample` or `shortcut`."""
  expansion = 1

  def __init__(self, in_planes, planes, stride=1, shortcut_name="downsample"):
    super().__init__()
    self.conv1 = _conv3x3(in_planes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut_name = shortcut_name
    shortcut = None
    if stride != 1 or in_planes != planes:
      shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                               nn.BatchNorm2d(planes))
    setattr(self, shortcut_name, shortcut)

  def forward(self, x):
    shortcut = getattr(self, self.shortcut_name)
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if shortcut is None else shortcut(x)))


class Bottleneck(nn.Module):
  """torchvision v1.5 / RepDistiller resnetv2 Bottleneck (stride on the 3x3 conv)."""
  expansion = 4

  def __init__(self, in_planes, planes, stride=1, shortcut_name="downsample"):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.shortcut_name = shortcut_name
    shortcut = None
    if stride != 1 or in_planes != 4 * planes:
      shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride=stride, bias=False),
                               nn.BatchNorm2d(4 * planes))
    setattr(self, shortcut_name, shortcut)

  def forward(self, x):
    shortcut = getattr(self, self.shortcut_name)
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if shortcut is None else shortcut(x)))


def _layer(block, in_planes, planes, count, stride, shortcut_name):
  layers = []
  for i in range(count):
    layers.append(block(in_planes, planes, stride if i == 0 else 1, shortcut_name))
    in_planes = planes * block.expansion
  return nn.Sequential(*layers), in_planes


class CifarResNet(nn.Module):
  """RepDistiller `models/resnet.py` ResNet (depth 6n+2, three stages, 8x8 pool, `fc`)."""

  def __init__(self, depth, filters, num_classes=100):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = _conv3x3(3, filters[0])
    self.bn1 = nn.BatchNorm2d(filters[0])
    in_planes = filters[0]
    self.layer1, in_planes = _layer(BasicBlock, in_planes, filters[1], n, 1, "downsample")
    self.layer2, in_planes = _layer(BasicBlock, in_planes, filters[2], n, 2, "downsample")
    self.layer3, in_planes = _layer(BasicBlock, in_planes, filters[3], n, 2, "downsample")
    self.fc = nn.Linear(filters[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(F.avg_pool2d(x, 8).flatten(1))


class WideBasicBlock(nn.Module):
  """RepDistiller `models/wrn.py` BasicBlock (pre-activation, dropout 0)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = _conv3x3(in_planes, out_planes, stride)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = _conv3x3(out_planes, out_planes)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else nn.Conv2d(  # pylint: disable=invalid-name
        in_planes, out_planes, 1, stride=stride, bias=False)

  def forward(self, x):
    activated = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(activated))))
    return y + (x if self.equal_in_out else self.convShortcut(activated))


class NetworkBlock(nn.Module):

  def __init__(self, count, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(count)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """RepDistiller `models/wrn.py` WideResNet (depth 6n+4)."""

  def __init__(self, depth, widen_factor, num_classes=100):
    super().__init__()
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = _conv3x3(3, channels[0])
    self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = nn.Linear(channels[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1))


class ResNet(nn.Module):
  """torchvision ResNet (7x7 stem, max pool, `fc`) or RepDistiller resnetv2 (`linear`)."""

  def __init__(self, block, blocks, num_classes, *, imagenet):
    super().__init__()
    self.imagenet = imagenet
    shortcut_name = "downsample" if imagenet else "shortcut"
    self.conv1 = (nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False) if imagenet
                  else _conv3x3(3, 64))
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
    in_planes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
      layer, in_planes = _layer(block, in_planes, planes, count, 1 if stage == 1 else 2,
                                shortcut_name)
      setattr(self, f"layer{stage}", layer)
    self.head_name = "fc" if imagenet else "linear"
    setattr(self, self.head_name, nn.Linear(in_planes, num_classes))

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return getattr(self, self.head_name)(x.mean(dim=(2, 3)))


_CIFAR = {"resnet8": (8, (16, 16, 32, 64)), "resnet14": (14, (16, 16, 32, 64)),
          "resnet20": (20, (16, 16, 32, 64)), "resnet32": (32, (16, 16, 32, 64)),
          "resnet44": (44, (16, 16, 32, 64)), "resnet56": (56, (16, 16, 32, 64)),
          "resnet110": (110, (16, 16, 32, 64)), "resnet8x4": (8, (32, 64, 128, 256)),
          "resnet32x4": (32, (32, 64, 128, 256))}
_WRN = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
_RESNET = {"resnet18": (BasicBlock, (2, 2, 2, 2), True),
           "resnet34": (BasicBlock, (3, 4, 6, 3), True),
           "resnet50": (Bottleneck, (3, 4, 6, 3), True),
           "resnet50_cifar": (Bottleneck, (3, 4, 6, 3), False)}
NAMES = sorted(_CIFAR) + sorted(_WRN) + sorted(_RESNET)


def build(name: str, num_classes: int) -> nn.Module:
  """The PyTorch model of kdjax model `name`."""
  if name in _CIFAR:
    return CifarResNet(*_CIFAR[name], num_classes=num_classes)
  if name in _WRN:
    return WideResNet(*_WRN[name], num_classes=num_classes)
  block, blocks, imagenet = _RESNET[name]
  return ResNet(block, blocks, num_classes, imagenet=imagenet)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics (so that a wrong mean/var mapping shows), eval mode.

  Weights are rescaled per layer so that activations stay O(1) through deep nets and the
  logits are a sensitive comparison.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) *
                            (1.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
      elif isinstance(module, nn.BatchNorm2d):
        shape = module.weight.shape
        module.weight.copy_(0.5 + 0.5 * torch.rand(shape, generator=generator))
        module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
        module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
  return model.eval()
