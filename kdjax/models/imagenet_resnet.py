"""ImageNet ResNets (resnet18/34/50, torchvision) and RepDistiller's CIFAR ResNet-50."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
