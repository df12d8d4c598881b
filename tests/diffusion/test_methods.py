"""The diffusion methods' targets and gradients against hand computations (numpy float64) with
the exact denoiser of a Gaussian data distribution, x ~ N(mu, s^2) per pixel."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.diffusion import denoiser_model, samplers, vp
from kdjax.diffusion.methods import consistency, dmd, progressive

MU, S = 0.3, 0.7


def gaussian_x0_vp(z, t):
  """E[x | z_t] for x ~ N(MU, S^2), z_t = a x + s_t eps (VP cosine)."""
  t = jnp.asarray(t).reshape((-1,) + (1,) * (z.ndim - 1))
  a, s = vp.alpha(t), vp.sigma(t)
  return MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (z - a * MU)


def gaussian_denoiser_edm(x, sigma):
  """E[x0 | x0 + sigma n] for x0 ~ N(MU, S^2)."""
  sigma = jnp.asarray(sigma).reshape((-1,) + (1,) * (x.ndim - 1))
  return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def test_progressive_target_is_two_teacher_ddim_steps():
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
  t = jnp.array([0.9, 0.5, 0.25])
  step = 0.125
  target = progressive.progressive_target(gaussian_x0_vp, z, t, step)
  for row in range(3):  # The teacher's two DDIM steps, by the scalar-time sampler.
    t_row = float(t[row])
    z_two = samplers.ddim_step(gaussian_x0_vp, z[row:row + 1], t_row, t_row - step)
    z_two = samplers.ddim_step(gaussian_x0_vp, z_two, t_row - step, t_row - 2 * step)
    # One student DDIM step from z_t with x-prediction `target` lands on z_two.
    student = lambda zz, tt, r=row: target[r:r + 1]
    z_one = samplers.ddim_step(student, z[row:row + 1], t_row, t_row - 2 * step)
    np.testing.assert_allclose(np.asarray(z_one), np.asarray(z_two), rtol=1e-5, atol=1e-5)


def test_progressive_target_at_the_last_step_is_the_teacher_sample():
  """t'' = 0: x̃ is the teacher's second DDIM step's image itself."""
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
  t = jnp.array([0.5, 0.5])
  target = progressive.progressive_target(gaussian_x0_vp, z, t, 0.25)
  z_mid = samplers.ddim_step(gaussian_x0_vp, z, 0.5, 0.25)
  np.testing.assert_allclose(target, gaussian_x0_vp(z_mid, jnp.full((2,), 0.25)), rtol=1e-5,
                             atol=1e-6)


def test_consistency_target_by_hand():
  x = np.array([[0.5, -1.0], [2.0, 0.1]])
  sigma, sigma_next = np.array([2.0, 0.5]), np.array([1.0, 0.2])
  target_fn = lambda x, s: 0.5 * x  # A stand-in EMA network.
  got = consistency.consistency_target(gaussian_denoiser_edm, target_fn, jnp.asarray(x),
                                       jnp.asarray(sigma), jnp.asarray(sigma_next))
  d = lambda x, s: MU + S ** 2 / (S ** 2 + s[:, None] ** 2) * (x - MU)
  slope = (x - d(x, sigma)) / sigma[:, None]
  euler = x + (sigma_next - sigma)[:, None] * slope
  slope2 = (euler - d(euler, sigma_next)) / sigma_next[:, None]
  heun = x + (sigma_next - sigma)[:, None] * 0.5 * (slope + slope2)
  np.testing.assert_allclose(got, 0.5 * heun, rtol=1e-6)


def test_dmd_generator_gradient_is_the_score_difference():
  x = jnp.array([[[0.2, -0.4], [1.0, 0.0]]])  # [1, 2, 2]
  real = jnp.array([[[0.0, 0.0], [0.5, 0.5]]])
  fake = jnp.array([[[0.1, -0.2], [0.7, 0.5]]])
  g = dmd.distribution_matching_gradient(x, real, fake)
  scale = np.mean(np.abs(np.asarray(x) - np.asarray(real)))  # 0.425
  np.testing.assert_allclose(g, (np.asarray(fake) - np.asarray(real)) / scale, rtol=1e-6)
  grad = jax.grad(lambda x: dmd.distribution_matching_loss(x, g).sum())(x)
  np.testing.assert_allclose(grad, np.asarray(g) / 4, rtol=1e-6)  # g / pixels


def test_consistency_flag_gives_identity_at_sigma_min():
  module = denoiser_model.DigitsDenoiser(channels=8)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
  variables = module.init(jax.random.PRNGKey(0), x)
  # Non-zero output layer, so that F != 0 and only the parameterisation makes f(x, σ_min) = x.
  variables = jax.tree.map(lambda v: v + 0.05, variables)
  inputs = denoiser_model.model_inputs(x, 0.002, jnp.array([1, 2]), consistency=True)
  np.testing.assert_allclose(denoiser_model.image(module.apply(variables, inputs)), x,
                             atol=1e-6)
  edm_inputs = denoiser_model.model_inputs(x, 0.002, jnp.array([1, 2]))
  assert np.abs(np.asarray(denoiser_model.image(module.apply(variables, edm_inputs)) - x)).max() > 1e-5
