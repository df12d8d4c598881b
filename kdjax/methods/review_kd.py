"""ReviewKD: knowledge review with ABF fusion and HCL (Chen et al. 2021)."""

METHODS = ()
