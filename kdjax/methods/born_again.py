"""Born-again networks: generations distilled from the previous one (Furlanello et al. 2018)."""

METHODS = ()
