"""Wide ResNets of RepDistiller (wrn_16_2, wrn_40_1, wrn_40_2)."""

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {}
