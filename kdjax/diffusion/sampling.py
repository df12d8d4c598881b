"""Sampling a denoiser *model* (`denoiser_model`, a kdjax apply function) from given noise.

`sample(apply, variables, noise, labels, sampler=..., num_steps=...)` runs one of

  'euler'  Euler on EDM's σ grid (ρ = 7): N steps, N NFE
  'heun'   EDM's Heun sampler (Algorithm 1): N steps, 2N − 1 NFE (EDM's 18 steps: 35 NFE)
  'ddim'   DDIM (η = 0) uniform in the VP cosine time t from t(σ_max) to 0, N NFE; in EDM's
           variables Euler on σ_i = tan(π t_i / 2), which spaces few steps far better than
           ρ = 7 does (EDM's grid with N = 2 spends its second step at σ_min)
  'consistency'  multistep consistency sampling (Song et al. 2023, Algorithm 1): f at σ_max,
           then for each later point σ_i: re-noise to sqrt(σ_i² − σ_min²) and apply f again;
           N NFE (the model must be a consistency function)

with `num_steps` static; `sample` is meant to be called under `jax.jit`.
"""

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.diffusion import denoiser_model, edm, samplers, vp

SAMPLERS = ("euler", "heun", "ddim", "consistency")
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def model_denoiser(apply: Callable, variables: Any, labels: Optional[jax.Array], *,
                   consistency: bool = False):
  """D(x, σ [B]) -> x̂ from a denoiser model's apply function (eval mode); `consistency`: the
  model's consistency parameterisation f(x, σ)."""
  def denoise(x, sigma):
    output, _ = apply(variables, denoiser_model.model_inputs(x, sigma, labels,
                                                             consistency=consistency),
                      train=False)
    return denoiser_model.image(output)
  return denoise


def ddim_sigmas(num_steps: int, sigma_max: float = SIGMA_MAX) -> jax.Array:
  """[N + 1] EDM σ's of DDIM's uniform VP times: tan(π t_i / 2), t_i from t(σ_max) to 0."""
  times = jnp.linspace(vp.t_from_edm_sigma(sigma_max), 0.0, num_steps + 1)
  return vp.edm_sigma(times).at[-1].set(0.0).astype(jnp.float32)


def consistency_sigmas(num_steps: int) -> Sequence[float]:
  """The points of multistep consistency sampling: σ_max, then N − 1 more from EDM's grid of
  N + 1 points (for N = 2: 80 and 0.82, near Song et al.'s hand-picked second step)."""
  if num_steps == 1:
    return (SIGMA_MAX,)
  ramp = np.arange(num_steps + 1, dtype=np.float64) / num_steps  # EDM eq. 5, in numpy:
  low, high = SIGMA_MIN ** (1.0 / RHO), SIGMA_MAX ** (1.0 / RHO)   # static under jit.
  return tuple(float(s) for s in ((high + ramp * (low - high)) ** RHO)[:num_steps])


def nfe(sampler: str, num_steps: int) -> int:
  """Network evaluations per sample."""
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


def sample(apply: Callable, variables: Any, noise: jax.Array, labels: Optional[jax.Array], *,
           sampler: str, num_steps: int, rng: Optional[jax.Array] = None) -> jax.Array:
  """Images [B, H, W, C] from standard normal `noise` [B, H, W, C] (x_T = σ_max · noise).

  `rng` is the re-noising key of multistep consistency sampling (unused otherwise)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sample: sampler={sampler!r}; valid: {', '.join(SAMPLERS)}.")
  denoise = model_denoiser(apply, variables, labels, consistency=sampler == "consistency")
  if sampler == "euler":
    return samplers.edm_euler(denoise, noise, num_steps=num_steps).samples
  if sampler == "heun":
    return samplers.edm_heun(denoise, noise, num_steps=num_steps).samples
  if sampler == "ddim":
    sigmas = ddim_sigmas(num_steps)
    return samplers.solve_euler(denoise, noise.astype(jnp.float32) * sigmas[0], sigmas)
  points = consistency_sigmas(num_steps)
  x = denoise(noise.astype(jnp.float32) * points[0], jnp.full(noise.shape[:1], points[0]))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  for i, sigma in enumerate(points[1:]):
    fresh = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    x_t = x + (sigma ** 2 - SIGMA_MIN ** 2) ** 0.5 * fresh
    x = denoise(x_t, jnp.full(noise.shape[:1], sigma))
  return x
