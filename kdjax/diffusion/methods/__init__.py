"""Diffusion distillation methods (registered in `kdjax.methods.registry`):

  progressive  Salimans & Ho 2022: two teacher DDIM steps in one, rounds of halving
  consistency  Song et al. 2023: consistency distillation with an EMA target
  dmd          Yin et al. 2024: distribution matching with an online fake score + regression
"""
