"""Diffusion models: the EDM and VP formulations, ODE samplers, a small U-Net, sample metrics.

  edm         Karras et al. 2022: σ grid, preconditioning, loss; consistency parameterisation
  vp          cosine VP schedule, log-SNR, v-prediction (Salimans & Ho 2022)
  samplers    Euler, Heun (EDM Algorithm 1), DDIM as `lax.fori_loop`s with a static step count
  unet        a small U-Net denoiser network and its registry (`get_denoiser`)
  metrics     Fréchet distance, precision/recall (k-NN), class coverage (numpy float64)
  digits      scikit-learn's 8x8 digits in [−1, 1], fixed train / held-out split
  classifier  the digits classifier whose embedding the metrics use
  train_teacher  the digits teacher's training and measurement script (import it explicitly)
"""

from kdjax.diffusion import classifier, digits, edm, metrics, samplers, unet, vp

__all__ = ["classifier", "digits", "edm", "metrics", "samplers", "unet", "vp"]
