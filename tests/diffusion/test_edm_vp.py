"""EDM preconditioning, the consistency parameterisation and the VP cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.diffusion import edm, vp

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0])


def test_karras_sigmas_match_eq5():
  n, lo, hi, rho = 18, 0.002, 80.0, 7.0
  i = np.arange(n, dtype=np.float64)
  expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  got = np.asarray(edm.karras_sigmas(n))
  assert got.shape == (n + 1,) and got[-1] == 0.0
  np.testing.assert_allclose(got[:-1], expected, rtol=1e-5)
  np.testing.assert_allclose(edm.karras_sigmas(1), [80.0, 0.0])
  with pytest.raises(ValueError, match="num_steps must be a positive int"):
    edm.karras_sigmas(0)


@pytest.mark.parametrize("sigma_data", [0.5, 0.85])
def test_preconditioning_limits_and_unit_variance(sigma_data):
  assert float(edm.c_skip(0.0, sigma_data)) == 1.0
  assert float(edm.c_out(0.0, sigma_data)) == 0.0
  assert float(edm.c_skip(1e6, sigma_data)) < 1e-10
  np.testing.assert_allclose(edm.c_out(1e6, sigma_data), sigma_data, rtol=1e-6)
  np.testing.assert_allclose(edm.loss_weight(SIGMAS, sigma_data) * edm.c_out(SIGMAS, sigma_data) ** 2,
                             1.0, rtol=1e-5)
  np.testing.assert_allclose(edm.c_noise(np.e ** 4), 1.0, rtol=1e-6)
  # Unit variance (EDM Appendix B.6) on data with E[x²] = σ_d²: of the network's input
  # c_in (x + σn), and of its effective training target (x − c_skip (x + σn)) / c_out.
  rng = np.random.default_rng(0)
  x = rng.normal(0.0, sigma_data, 200_000)
  n = rng.normal(size=x.shape)
  for sigma in SIGMAS[1:]:
    noisy = x + sigma * n
    network_input = float(edm.c_in(sigma, sigma_data)) * noisy
    target = (x - float(edm.c_skip(sigma, sigma_data)) * noisy) / float(edm.c_out(sigma, sigma_data))
    np.testing.assert_allclose(network_input.var(), 1.0, rtol=0.02)
    np.testing.assert_allclose(np.mean(target ** 2), 1.0, rtol=0.02)


def test_consistency_boundary_condition():
  sigma_min, sigma_data = 0.002, 0.5
  assert float(edm.consistency_c_skip(sigma_min, sigma_min=sigma_min, sigma_data=sigma_data)) == 1.0
  assert float(edm.consistency_c_out(sigma_min, sigma_min=sigma_min, sigma_data=sigma_data)) == 0.0
  # Away from σ_min it approaches the EDM denoiser's coefficients.
  np.testing.assert_allclose(edm.consistency_c_skip(80.0), edm.c_skip(80.0), rtol=1e-3)
  np.testing.assert_allclose(edm.consistency_c_out(80.0), edm.c_out(80.0), rtol=1e-3)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
  wild = lambda variables, inputs, noise, labels: 1e3 * jnp.ones_like(inputs)
  f = edm.consistency_function(wild, None, x, sigma_min, sigma_min=sigma_min)
  np.testing.assert_array_equal(f, x)
  assert not np.allclose(edm.consistency_function(wild, None, x, 1.0), x)


def test_denoise_applies_the_preconditioning():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 1))
  sigma = jnp.array([0.3, 7.0])
  seen = {}

  def raw(variables, inputs, noise_labels, labels):
    seen.update(inputs=inputs, noise_labels=noise_labels, labels=labels)
    return variables * jnp.ones_like(inputs)

  out = edm.denoise(raw, 2.0, x, sigma, jnp.array([1, 2]), sigma_data=0.5)
  s = np.asarray(sigma, np.float64)[:, None, None, None]
  xs = np.asarray(x, np.float64)
  expected = 0.25 / (s ** 2 + 0.25) * xs + s * 0.5 / np.sqrt(s ** 2 + 0.25) * 2.0
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  np.testing.assert_allclose(seen["inputs"], xs / np.sqrt(s ** 2 + 0.25), rtol=1e-5)
  np.testing.assert_allclose(seen["noise_labels"], np.log([0.3, 7.0]) / 4, rtol=1e-5)
  np.testing.assert_array_equal(seen["labels"], [1, 2])


def test_training_sigma_is_log_normal_and_loss_is_per_example():
  sigma = edm.sample_training_sigma(jax.random.PRNGKey(0), (100_000,))
  log_sigma = np.log(np.asarray(sigma, np.float64))
  assert abs(log_sigma.mean() + 1.2) < 0.02 and abs(log_sigma.std() - 1.2) < 0.02
  images = jax.random.uniform(jax.random.PRNGKey(2), (5, 4, 4, 1), minval=-1, maxval=1)
  zero_net = lambda variables, inputs, noise, labels: jnp.zeros_like(inputs)
  loss = edm.denoising_loss(zero_net, None, images, jax.random.PRNGKey(3))
  # By hand: with F = 0, D = c_skip (x + σn), with the same σ and n as the function draws.
  sigma_rng, noise_rng = jax.random.split(jax.random.PRNGKey(3))
  s = np.asarray(edm.sample_training_sigma(sigma_rng, (5,)), np.float64)
  n = np.asarray(jax.random.normal(noise_rng, images.shape), np.float64)
  x = np.asarray(images, np.float64)
  sb = s[:, None, None, None]
  d = 0.25 / (sb ** 2 + 0.25) * (x + sb * n)
  expected = (sb ** 2 + 0.25) / (sb * 0.5) ** 2 * (d - x) ** 2
  assert loss.shape == (5,)
  np.testing.assert_allclose(loss, expected.mean(axis=(1, 2, 3)), rtol=1e-4)


def test_vp_schedule_and_conversions():
  t = np.linspace(0.01, 0.99, 11)
  np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(vp.t_from_log_snr(vp.log_snr(t)), t, rtol=1e-5)
  np.testing.assert_allclose(vp.t_from_edm_sigma(vp.edm_sigma(t)), t, rtol=1e-5)
  np.testing.assert_allclose(np.exp(vp.log_snr(t)), (np.cos(np.pi * t / 2) / np.sin(np.pi * t / 2)) ** 2,
                             rtol=1e-4)
  np.testing.assert_allclose(vp.truncated_snr_weight(t),
                             np.maximum(np.exp(vp.log_snr(t)), 1.0), rtol=1e-4)
  assert float(vp.truncated_snr_weight(1.0)) == 1.0
  keys = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(keys[0], (11, 2, 2, 1))
  eps = jax.random.normal(keys[1], (11, 2, 2, 1))
  z = vp.diffuse(x, eps, t)
  v = vp.v_target(x, eps, t)
  np.testing.assert_allclose(vp.x0_from_v(z, v, t), x, atol=1e-5)
  np.testing.assert_allclose(vp.eps_from_v(z, v, t), eps, atol=1e-5)
  np.testing.assert_allclose(vp.x0_from_eps(z, eps, t), x, atol=1e-4)
  np.testing.assert_allclose(vp.eps_from_x0(z, x, t), eps, atol=1e-4)


def test_x0_predictor_from_edm_rescales():
  seen = {}
  def denoiser(x, sigma):
    seen.update(x=x, sigma=sigma)
    return 2.0 * x
  t = jnp.array([0.2, 0.7])
  z = jnp.ones((2, 1, 1, 1))
  out = vp.x0_predictor_from_edm(denoiser)(z, t)
  a = np.cos(np.pi * np.array([0.2, 0.7]) / 2)
  np.testing.assert_allclose(seen["sigma"], np.tan(np.pi * np.array([0.2, 0.7]) / 2), rtol=1e-5)
  np.testing.assert_allclose(out[:, 0, 0, 0], 2.0 / a, rtol=1e-5)
