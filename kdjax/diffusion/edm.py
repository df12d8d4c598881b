"""The EDM formulation (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364) and the consistency-model
parameterisation built on it (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469).

Data x ~ p_data, noised x_σ = x + σ n with n ~ N(0, I). A raw network F is wrapped into a
denoiser (EDM eq. 7, Table 1)

    D(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²)      c_out = σ σ_d / sqrt(σ² + σ_d²)
    c_in   = 1 / sqrt(σ² + σ_d²)      c_noise = ln(σ) / 4

with σ_d = `sigma_data`, the root mean square of the data (EDM assumes zero-mean data, so its
derivation uses E[x²] = σ_d²). Training minimises λ(σ) ||D(x + σn, σ) − x||² with
λ(σ) = 1 / c_out(σ)² (so the raw network's target has unit weight) and ln σ ~ N(P_mean, P_std²).
Sampling solves the probability-flow ODE dx/dσ = (x − D(x, σ)) / σ from σ_max to 0 on the
discretisation of EDM eq. 5 (see `karras_sigmas`; the solvers are in `samplers.py`).

Defaults are EDM's (σ_min 0.002, σ_max 80, ρ 7, σ_d 0.5, P_mean −1.2, P_std 1.2, chosen for
CIFAR-10 in [−1, 1]). For the 8x8 digits in [−1, 1] (`digits.py`) only σ_d changes, to the data's
measured RMS (`digits.SIGMA_DATA`, 0.85): the digits' pixels sit at −1 most of the time, so their
second moment is well above CIFAR's 0.5². σ_max = 80 is kept: a 64-pixel image in [−1, 1] has
norm ≤ 8, so noise of norm 80·8 = 640 leaves no trace of the data (a smaller σ_max would do, but
ρ = 7 puts few steps up there anyway). σ_min = 0.002 is kept: well below the digits' quantisation
step (2/16 = 0.125), so the last step changes nothing visible.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class EDMConfig(NamedTuple):
  """The constants of the EDM formulation (defaults: Karras et al. 2022, Table 1)."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2


def karras_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jax.Array:
  """The EDM time discretisation (eq. 5) with σ_N = 0 appended.

    σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,  i = 0..N−1;  σ_N = 0.

  Args:
    num_steps: N ≥ 1 (a Python int). N = 1 gives [σ_max, 0] (one jump to the denoised image).
  Returns:
    [N + 1] float32, decreasing from σ_max to σ_min, then 0.
  """
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"karras_sigmas: num_steps must be a positive int, got {num_steps!r}.")
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min},"
                     f" sigma_max={sigma_max}.")
  if num_steps == 1:
    return jnp.asarray([sigma_max, 0.0], jnp.float32)
  ramp = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)
  low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigmas = (high + ramp * (low - high)) ** rho
  return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def c_skip(sigma, sigma_data: float = 0.5):
  """σ_d² / (σ² + σ_d²): 1 at σ = 0 (the input is already clean), → 0 as σ → ∞."""
  return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def c_out(sigma, sigma_data: float = 0.5):
  """σ σ_d / sqrt(σ² + σ_d²): 0 at σ = 0, → σ_d as σ → ∞."""
  return sigma * sigma_data / jnp.sqrt(sigma ** 2 + sigma_data ** 2)


def c_in(sigma, sigma_data: float = 0.5):
  """1 / sqrt(σ² + σ_d²): gives the network unit-variance inputs, Var(c_in (x + σn)) = 1."""
  return 1.0 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)


def c_noise(sigma):
  """ln(σ) / 4: the scalar the network is conditioned on."""
  return jnp.log(sigma) / 4.0


def loss_weight(sigma, sigma_data: float = 0.5):
  """λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out(σ)² (EDM Table 1)."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_training_sigma(rng: jax.Array, shape, *, p_mean: float = -1.2,
                          p_std: float = 1.2) -> jax.Array:
  """σ with ln σ ~ N(P_mean, P_std²) (EDM Table 1), float32 of `shape` (e.g. (B,))."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))


def _per_example(sigma, x):
  """σ as [B] (or a scalar) broadcast to x's [B, ...] shape."""
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim == 0:
    sigma = jnp.full(x.shape[:1], sigma)
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def denoise(apply: Callable[..., jax.Array], variables: Any, x: jax.Array, sigma,
            labels: Optional[jax.Array] = None, *, sigma_data: float = 0.5) -> jax.Array:
  """D(x, σ) = c_skip x + c_out F(c_in x, c_noise, labels): EDM's preconditioned denoiser.

  Args:
    apply: the raw network, `apply(variables, inputs [B, H, W, C], noise_labels [B], labels)
      -> [B, H, W, C]` (e.g. `unet.UNet.apply`, whose `labels` may be None).
    variables: the network's variables.
    x: noisy images x + σ n, [B, H, W, C].
    sigma: noise level, a scalar or [B].
    labels: int [B] class labels, or None.
    sigma_data: σ_d.
  Returns:
    x0_hat, [B, H, W, C] float32.
  """
  sigma_b = _per_example(sigma, x)
  raw = apply(variables, c_in(sigma_b, sigma_data) * x, c_noise(sigma_b.reshape(-1)), labels)
  return c_skip(sigma_b, sigma_data) * x + c_out(sigma_b, sigma_data) * raw.astype(jnp.float32)


def denoising_loss(apply: Callable[..., jax.Array], variables: Any, images: jax.Array,
                   rng: jax.Array, labels: Optional[jax.Array] = None, *,
                   config: EDMConfig = EDMConfig()) -> jax.Array:
  """EDM's training loss per example: λ(σ) mean_pixels (D(x + σn, σ) − x)², ln σ ~ N(P_mean, P_std²).

  Args:
    images: clean x, [B, H, W, C].
  Returns:
    [B] float32 (unreduced, like every kdjax loss).
  """
  sigma_rng, noise_rng = jax.random.split(rng)
  sigma = sample_training_sigma(sigma_rng, images.shape[:1], p_mean=config.p_mean,
                                p_std=config.p_std)
  noisy = images + _per_example(sigma, images) * jax.random.normal(noise_rng, images.shape)
  x0_hat = denoise(apply, variables, noisy, sigma, labels, sigma_data=config.sigma_data)
  squared = jnp.mean(jnp.square(x0_hat - images), axis=tuple(range(1, images.ndim)))
  return loss_weight(sigma, config.sigma_data) * squared


def consistency_c_skip(sigma, *, sigma_min: float = 0.002, sigma_data: float = 0.5):
  """σ_d² / ((σ − σ_min)² + σ_d²) (Song et al. 2023, Appendix C): exactly 1 at σ = σ_min."""
  return sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)


def consistency_c_out(sigma, *, sigma_min: float = 0.002, sigma_data: float = 0.5):
  """σ_d (σ − σ_min) / sqrt(σ² + σ_d²) (Song et al. 2023, Appendix C): exactly 0 at σ = σ_min,
  so a consistency function f(x, σ) = c_skip x + c_out F satisfies f(x, σ_min) = x."""
  return sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma ** 2 + sigma_data ** 2)


def consistency_function(apply: Callable[..., jax.Array], variables: Any, x: jax.Array, sigma,
                         labels: Optional[jax.Array] = None, *, sigma_min: float = 0.002,
                         sigma_data: float = 0.5) -> jax.Array:
  """f(x, σ) = c_skip^CM(σ) x + c_out^CM(σ) F(c_in(σ) x, c_noise(σ)) (Song et al. 2023, eq. 3
  with EDM's c_in / c_noise, as in their code): the boundary condition f(x, σ_min) = x holds
  exactly, whatever F is. Same arguments and shapes as `denoise`."""
  sigma_b = _per_example(sigma, x)
  raw = apply(variables, c_in(sigma_b, sigma_data) * x, c_noise(sigma_b.reshape(-1)), labels)
  skip = consistency_c_skip(sigma_b, sigma_min=sigma_min, sigma_data=sigma_data)
  out = consistency_c_out(sigma_b, sigma_min=sigma_min, sigma_data=sigma_data)
  return skip * x + out * raw.astype(jnp.float32)
