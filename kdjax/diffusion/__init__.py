"""Diffusion models: the EDM and VP formulations, ODE samplers, a small U-Net, sample metrics.

  edm       Karras et al. 2022: σ grid, preconditioning, loss; consistency parameterisation
  vp        cosine VP schedule, log-SNR, v-prediction (Salimans & Ho 2022)
  samplers  Euler, Heun (EDM Algorithm 1), DDIM as `lax.fori_loop`s with a static step count
"""

from kdjax.diffusion import edm, samplers, vp

__all__ = ["edm", "samplers", "vp"]
