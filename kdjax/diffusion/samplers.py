"""Deterministic samplers of the probability-flow ODE, as `lax.fori_loop`s.

Every sampler is traceable with the number of steps a Python int (static: it sets the loop
length and the returned NFE), so one `jax.jit` around the call compiles the whole solve:

    sample = jax.jit(lambda variables, noise: samplers.edm_heun(
        lambda x, s: edm.denoise(net.apply, variables, x, s), noise, num_steps=18).samples)

A sampler takes a denoiser, not a network: `D(x, σ) -> x0_hat` in EDM's variables (x = data +
σ n, σ of shape [B]) for `edm_euler` / `edm_heun`, or a VP predictor `(z_t, t [B]) -> x0_hat`
for `ddim` (`vp.x0_predictor_from_edm / _from_v / _from_eps` build one). An exact analytic
denoiser plugs in the same way (tests/diffusion/test_samplers.py uses a Gaussian's).

NFE (network evaluations per sample): Euler N, Heun 2N − 1 (its last step, to σ = 0, is an
Euler step: EDM Algorithm 1), DDIM N.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.diffusion import edm, vp

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


class SampleResult(NamedTuple):
  """samples: [B, ...] float32 images at σ = 0; nfe: network evaluations per sample (int)."""
  samples: jax.Array
  nfe: int


def _check_steps(name: str, num_steps) -> None:
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"{name}: num_steps must be a positive Python int (it is static), "
                     f"got {num_steps!r}.")


def _sigma_batch(sigma, x):
  return jnp.full(x.shape[:1], sigma, jnp.float32)


def euler_step(denoiser: Denoiser, x, sigma, sigma_next):
  """One Euler step of dx/dσ = (x − D(x, σ)) / σ from σ to σ_next (scalars)."""
  slope = (x - denoiser(x, _sigma_batch(sigma, x))) / sigma
  return x + (sigma_next - sigma) * slope


def heun_step(denoiser: Denoiser, x, sigma, sigma_next):
  """One Heun (trapezoidal, 2nd-order) step from σ to σ_next > 0 (EDM Algorithm 1, lines 5-8)."""
  slope = (x - denoiser(x, _sigma_batch(sigma, x))) / sigma
  x_euler = x + (sigma_next - sigma) * slope
  slope_next = (x_euler - denoiser(x_euler, _sigma_batch(sigma_next, x))) / sigma_next
  return x + (sigma_next - sigma) * 0.5 * (slope + slope_next)


def solve_euler(denoiser: Denoiser, x, sigmas: jax.Array) -> jax.Array:
  """Euler on the grid `sigmas` [N + 1] (decreasing, may end at 0) from x at sigmas[0]."""
  body = lambda i, x: euler_step(denoiser, x, sigmas[i], sigmas[i + 1])
  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def solve_heun(denoiser: Denoiser, x, sigmas: jax.Array) -> jax.Array:
  """Heun on the grid `sigmas` [N + 1] ending at 0: N − 1 Heun steps, then Euler to σ = 0."""
  num_steps = sigmas.shape[0] - 1
  body = lambda i, x: heun_step(denoiser, x, sigmas[i], sigmas[i + 1])
  x = jax.lax.fori_loop(0, num_steps - 1, body, x)
  return euler_step(denoiser, x, sigmas[num_steps - 1], sigmas[num_steps])


def edm_euler(denoiser: Denoiser, noise: jax.Array, *, num_steps: int,
              sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0) -> SampleResult:
  """Euler's method on EDM's σ grid (`edm.karras_sigmas`), from x = σ_max · noise.

  Args:
    denoiser: D(x [B, ...], σ [B]) -> x0_hat [B, ...].
    noise: standard normal, [B, ...].
    num_steps: N (Python int), the number of network evaluations.
  """
  _check_steps("edm_euler", num_steps)
  sigmas = edm.karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  x = noise.astype(jnp.float32) * sigmas[0]
  return SampleResult(solve_euler(denoiser, x, sigmas), num_steps)


def edm_heun(denoiser: Denoiser, noise: jax.Array, *, num_steps: int,
             sigma_min: float = 0.002, sigma_max: float = 80.0,
             rho: float = 7.0) -> SampleResult:
  """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1; S_churn = 0).

  N steps on `edm.karras_sigmas(N)`: Heun's method, except an Euler step to σ = 0, so
  2N − 1 network evaluations (EDM's CIFAR-10 setting is N = 18, 35 NFE).
  """
  _check_steps("edm_heun", num_steps)
  sigmas = edm.karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  x = noise.astype(jnp.float32) * sigmas[0]
  return SampleResult(solve_heun(denoiser, x, sigmas), 2 * num_steps - 1)


def ddim_step(predict_x0: vp.X0Predictor, z, t, t_next):
  """One deterministic DDIM step (Song, Meng & Ermon 2021, eq. 12 with η = 0) from t to t_next:
  x̂ = f(z_t, t), ε̂ = (z_t − α_t x̂) / σ_t, z_next = α_next x̂ + σ_next ε̂."""
  x0 = predict_x0(z, jnp.full(z.shape[:1], t, jnp.float32))
  eps = (z - vp.alpha(t) * x0) / vp.sigma(t)
  return vp.alpha(t_next) * x0 + vp.sigma(t_next) * eps


def ddim(predict_x0: vp.X0Predictor, noise: jax.Array, *, num_steps: int,
         t_max: float = 1.0) -> SampleResult:
  """DDIM (η = 0) on the VP cosine schedule, t uniform from t_max to 0 (Salimans & Ho 2022's
  sampler for progressive distillation), from z = σ_{t_max} · noise.

  Starting at σ_{t_max} · noise is EDM's x = σ_max · noise in VP variables (t_max =
  `vp.t_from_edm_sigma(sigma_max)`), and exactly z_1 ~ N(0, I) at t_max = 1. In EDM's variables
  DDIM is Euler's method on the grid σ_i = tan(π t_i / 2) (Karras et al. 2022, Sec. 3).

  Args:
    predict_x0: (z_t [B, ...], t [B]) -> x0_hat; needs t_max < 1 if built from an EDM or ε model.
    noise: standard normal, [B, ...].
    num_steps: N (Python int).
  Returns:
    samples z_0 (= x̂ of the last step), N network evaluations.
  """
  _check_steps("ddim", num_steps)
  if not 0.0 < t_max <= 1.0:
    raise ValueError(f"ddim: t_max must be in (0, 1], got {t_max!r}.")
  times = jnp.linspace(t_max, 0.0, num_steps + 1, dtype=jnp.float32)
  z = noise.astype(jnp.float32) * vp.sigma(times[0])
  body = lambda i, z: ddim_step(predict_x0, z, times[i], times[i + 1])
  return SampleResult(jax.lax.fori_loop(0, num_steps, body, z), num_steps)
