"""DINO: self-distillation with no labels (Caron et al. 2021)."""

METHODS = ()
