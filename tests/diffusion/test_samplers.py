"""Samplers on a Gaussian data distribution N(mu, s²), whose denoiser is known in closed form.

For x ~ N(mu, s²) per pixel, E[x | x + σn] = (s² x + σ² mu) / (s² + σ²), and the probability-flow
ODE dx/dσ = (x − D(x, σ)) / σ = σ (x − mu) / (s² + σ²) integrates by hand to
    x(σ) = mu + (x_T − mu) sqrt(s² + σ²) / sqrt(s² + σ_T²).
Each sampler is checked against that solution, sample by sample, and through the samples' mean
and variance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.diffusion import samplers, vp

MU, S = 0.7, 0.3
SIGMA_MAX = 80.0
NOISE = jax.random.normal(jax.random.PRNGKey(0), (8192, 2, 2, 1))


def gaussian_denoiser(x, sigma):
  sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  return (S ** 2 * x + sigma ** 2 * MU) / (S ** 2 + sigma ** 2)


def exact_solution(x_t, sigma_t, sigma=0.0):
  """The hand-integrated ODE, float64."""
  x_t = np.asarray(x_t, np.float64)
  return MU + (x_t - MU) * np.sqrt(S ** 2 + sigma ** 2) / np.sqrt(S ** 2 + sigma_t ** 2)


def vp_posterior_mean(z, t):
  """E[x | z_t] for z_t = α x + σ ε, x ~ N(mu, s²)."""
  t = t.reshape((-1,) + (1,) * (z.ndim - 1))
  a, s = vp.alpha(t), vp.sigma(t)
  return MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (z - a * MU)


def check_moments(samples, mean, std, tol):
  samples = np.asarray(samples, np.float64)
  assert abs(samples.mean() - mean) < tol, (samples.mean(), mean)
  assert abs(samples.std() - std) < tol, (samples.std(), std)


@pytest.mark.parametrize("sampler,num_steps,nfe,tol", [
    (samplers.edm_heun, 18, 35, 0.1),  # EDM's CIFAR setting; |x_T| reaches 300 here.
    (samplers.edm_heun, 64, 127, 0.01),
    (samplers.edm_euler, 256, 256, 0.03),
])
def test_edm_samplers_follow_the_exact_ode(sampler, num_steps, nfe, tol):
  run = jax.jit(lambda noise: sampler(gaussian_denoiser, noise, num_steps=num_steps,
                                      sigma_max=SIGMA_MAX).samples)
  samples = run(NOISE)
  assert sampler(gaussian_denoiser, NOISE[:2], num_steps=num_steps).nfe == nfe
  expected = exact_solution(NOISE * SIGMA_MAX, SIGMA_MAX)
  np.testing.assert_allclose(samples, expected, atol=tol)
  # The ODE carries N(0, σ_max²) to N(mu (1 − r), (σ_max r)²), r = s / sqrt(s² + σ_max²):
  # the data distribution up to the O(s / σ_max) mismatch of the prior.
  check_moments(samples, MU, S, tol=0.02)


@pytest.mark.parametrize("sampler,order", [(samplers.edm_euler, 1), (samplers.edm_heun, 2)])
def test_convergence_order(sampler, order):
  """4x the steps divides the error by about 4^order (1st-order Euler, 2nd-order Heun)."""
  noise = NOISE[:256]
  expected = exact_solution(noise * SIGMA_MAX, SIGMA_MAX)
  error = lambda n: np.abs(np.asarray(sampler(gaussian_denoiser, noise, num_steps=n).samples)
                           - expected).max()
  ratio = error(64) / error(256)
  assert 0.6 * 4 ** order < ratio < 1.6 * 4 ** order, ratio


def test_one_euler_step_is_the_denoiser_at_sigma_max():
  result = samplers.edm_euler(gaussian_denoiser, NOISE[:4], num_steps=1, sigma_max=SIGMA_MAX)
  x = np.asarray(NOISE[:4], np.float64) * SIGMA_MAX
  expected = (S ** 2 * x + SIGMA_MAX ** 2 * MU) / (S ** 2 + SIGMA_MAX ** 2)
  np.testing.assert_allclose(result.samples, expected, rtol=1e-4, atol=1e-5)
  assert result.nfe == 1


@pytest.mark.parametrize("parameterisation", ["x0", "v", "eps", "edm"])
def test_ddim_with_exact_predictions_samples_the_gaussian(parameterisation):
  if parameterisation == "x0":
    predict_x0, t_max = vp_posterior_mean, 1.0
  elif parameterisation == "v":
    def predict_v(z, t):
      x0 = vp_posterior_mean(z, t)
      return vp.v_target(x0, vp.eps_from_x0(z, x0, t), t)
    predict_x0, t_max = vp.x0_predictor_from_v(predict_v), 1.0
  elif parameterisation == "eps":
    predict_eps = lambda z, t: vp.eps_from_x0(z, vp_posterior_mean(z, t), t)
    predict_x0, t_max = vp.x0_predictor_from_eps(predict_eps), 0.99
  else:
    predict_x0 = vp.x0_predictor_from_edm(gaussian_denoiser)
    t_max = float(vp.t_from_edm_sigma(SIGMA_MAX))
  run = jax.jit(lambda noise: samplers.ddim(predict_x0, noise, num_steps=200,
                                            t_max=t_max).samples)
  samples = run(NOISE)
  # In EDM's variables the start is x_T = z / α = σ_T · noise, σ_T = tan(π t_max / 2).
  sigma_t = np.tan(0.5 * np.pi * t_max) if t_max < 1 else np.inf
  if np.isinf(sigma_t):
    expected = MU + S * np.asarray(NOISE, np.float64)  # the limit σ_T → ∞
  else:
    expected = exact_solution(np.asarray(NOISE, np.float64) * sigma_t, sigma_t)
  np.testing.assert_allclose(samples, expected, atol=0.03)  # 1st order: 0.014 at 200 steps
  check_moments(samples, MU, S, tol=0.02)


def test_ddim_is_euler_in_edm_variables():
  """Karras et al. 2022, Sec. 3: DDIM = Euler on σ_i = tan(π t_i / 2) in x = z / α."""
  t_max, num_steps = float(vp.t_from_edm_sigma(SIGMA_MAX)), 6
  ddim = samplers.ddim(vp.x0_predictor_from_edm(gaussian_denoiser), NOISE[:64],
                       num_steps=num_steps, t_max=t_max).samples
  sigmas = vp.edm_sigma(jnp.linspace(t_max, 0.0, num_steps + 1))
  euler = samplers.solve_euler(gaussian_denoiser, NOISE[:64] * sigmas[0], sigmas)
  np.testing.assert_allclose(ddim, euler, rtol=1e-4, atol=1e-4)


def test_bad_step_count_is_refused():
  with pytest.raises(ValueError, match="num_steps must be a positive Python int"):
    samplers.edm_heun(gaussian_denoiser, NOISE[:2], num_steps=0)
