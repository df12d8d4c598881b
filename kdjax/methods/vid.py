"""VID: variational information distillation (Ahn et al. 2019)."""

METHODS = ()
