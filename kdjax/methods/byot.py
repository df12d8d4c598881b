"""BYOT: be your own teacher, self-distillation through auxiliary exits (Zhang et al. 2019)."""

METHODS = ()
