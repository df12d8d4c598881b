"""Vision Transformers (vit_tiny, vit_small; timm definitions)."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
