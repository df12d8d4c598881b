"""CAT-KD: class attention transfer (Guo et al. 2023)."""

METHODS = ()
