"""MobileNetV2 (CIFAR, RepDistiller width 0.5) and MobileNetV1 (ImageNet)."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
