"""OFD: overhaul of feature distillation (Heo et al. 2019)."""

METHODS = ()
