"""ND: norm and direction distillation (Wang et al. 2023)."""

METHODS = ()
