"""CIFAR VGGs of RepDistiller (vgg8, vgg13: BatchNorm, conv bias)."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
