"""Diffusion distillation methods (registered in `kdjax.methods.registry`):

  progressive  Salimans & Ho 2022: two teacher DDIM steps in one, rounds of halving
  consistency  Song et al. 2023: consistency distillation with an EMA target
  dmd          Yin et al. 2024: distribution matching with an online fake score + regression
"""

# The method registry imports these modules; importing it first keeps `import
# kdjax.diffusion.methods.<name>` (before anything else) free of a circular import.
from kdjax import methods as _registry  # pylint: disable=unused-import
