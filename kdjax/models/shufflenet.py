"""ShuffleNetV1 and V2 (CIFAR, RepDistiller definitions)."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
