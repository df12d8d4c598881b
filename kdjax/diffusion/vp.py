"""The variance-preserving cosine schedule with v-prediction, as used by progressive
distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", arXiv:2202.00512; schedule from Nichol & Dhariwal 2021, without their offset s).

    z_t = α_t x + σ_t ε,   α_t = cos(π t / 2),  σ_t = sin(π t / 2),  t ∈ [0, 1]
    log-SNR λ_t = log(α_t² / σ_t²) = −2 log tan(π t / 2)
    v = α_t ε − σ_t x   (so x = α_t z_t − σ_t v and ε = σ_t z_t + α_t v, since α² + σ² = 1)

The same process in EDM's variables (`edm.py`) is x_σ = z_t / α_t with σ = σ_t / α_t = tan(π t/2);
`x0_predictor_from_edm` uses that to run an EDM denoiser in a VP sampler (DDIM).
"""

from typing import Callable

import jax
import jax.numpy as jnp

# A VP denoiser: (z_t [B, ...], t [B]) -> x0_hat [B, ...].
X0Predictor = Callable[[jax.Array, jax.Array], jax.Array]


def alpha(t):
  """α_t = cos(π t / 2): 1 at t = 0, 0 at t = 1."""
  return jnp.cos(0.5 * jnp.pi * t)


def sigma(t):
  """σ_t = sin(π t / 2)."""
  return jnp.sin(0.5 * jnp.pi * t)


def log_snr(t):
  """λ_t = log(α_t² / σ_t²) = −2 log tan(π t / 2)."""
  return -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * t))


def t_from_log_snr(lam):
  """The inverse of `log_snr`: t = (2/π) arctan(exp(−λ/2))."""
  return 2.0 / jnp.pi * jnp.arctan(jnp.exp(-0.5 * lam))


def edm_sigma(t):
  """EDM's noise level of the same point: σ_t / α_t = tan(π t / 2)."""
  return jnp.tan(0.5 * jnp.pi * t)


def t_from_edm_sigma(edm_sigma_value):
  """The inverse of `edm_sigma`: t = (2/π) arctan(σ)."""
  return 2.0 / jnp.pi * jnp.arctan(edm_sigma_value)


def _broadcast(t, x):
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    t = jnp.full(x.shape[:1], t)
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def diffuse(x, noise, t):
  """z_t = α_t x + σ_t ε; x, noise [B, ...], t a scalar or [B]."""
  t = _broadcast(t, x)
  return alpha(t) * x + sigma(t) * noise


def v_target(x, noise, t):
  """v = α_t ε − σ_t x, the v-prediction target (Salimans & Ho 2022, Appendix D)."""
  t = _broadcast(t, x)
  return alpha(t) * noise - sigma(t) * x


def x0_from_v(z, v, t):
  """x̂ = α_t z − σ_t v̂."""
  t = _broadcast(t, z)
  return alpha(t) * z - sigma(t) * v


def eps_from_v(z, v, t):
  """ε̂ = σ_t z + α_t v̂."""
  t = _broadcast(t, z)
  return sigma(t) * z + alpha(t) * v


def x0_from_eps(z, eps, t):
  """x̂ = (z − σ_t ε̂) / α_t (undefined at t = 1, where α_t = 0: why v-prediction is used)."""
  t = _broadcast(t, z)
  return (z - sigma(t) * eps) / alpha(t)


def eps_from_x0(z, x0, t):
  """ε̂ = (z − α_t x̂) / σ_t (undefined at t = 0)."""
  t = _broadcast(t, z)
  return (z - alpha(t) * x0) / sigma(t)


def truncated_snr_weight(t):
  """max(SNR_t, 1) = max(α_t² / σ_t², 1): Salimans & Ho's "truncated SNR" weighting of the
  x-space loss ||x − x̂||² (Sec. 4): like ε-prediction's SNR weight at high SNR, but not 0 at
  t = 1, where a one-step student is evaluated."""
  return jnp.maximum(jnp.square(alpha(t) / sigma(t)), 1.0)


def x0_predictor_from_edm(denoiser: Callable[[jax.Array, jax.Array], jax.Array]) -> X0Predictor:
  """A VP denoiser (z_t, t) -> x̂ from an EDM one D(x, σ): x̂ = D(z_t / α_t, σ_t / α_t).

  Needs t < 1 (α_t > 0): start a VP sampler at `t_from_edm_sigma(sigma_max)`.
  """
  def predict_x0(z, t):
    t_b = _broadcast(t, z)
    return denoiser(z / alpha(t_b), (sigma(t_b) / alpha(t_b)).reshape(-1))
  return predict_x0


def x0_predictor_from_v(predict_v: Callable[[jax.Array, jax.Array], jax.Array]) -> X0Predictor:
  """A VP denoiser (z_t, t) -> x̂ from a v-prediction network v̂(z_t, t)."""
  return lambda z, t: x0_from_v(z, predict_v(z, t), t)


def x0_predictor_from_eps(predict_eps: Callable[[jax.Array, jax.Array], jax.Array]) -> X0Predictor:
  """A VP denoiser (z_t, t) -> x̂ from an ε-prediction network ε̂(z_t, t) (needs t < 1)."""
  return lambda z, t: x0_from_eps(z, predict_eps(z, t), t)
