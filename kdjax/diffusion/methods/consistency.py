"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, ICML 2023, arXiv:2303.01469,
Algorithm 2), from an EDM teacher.

On EDM's grid of N points (`edm.karras_sigmas(N)` without its final 0, σ_0 = σ_max > ... >
σ_{N−1} = σ_min), per example (x, c):

    n ~ U{0, ..., N − 2},  σ = σ_n,  σ' = σ_{n+1} < σ,  ε ~ N(0, I),  x_σ = x + σ ε
    x_σ' = one Heun step of the teacher's probability-flow ODE dx/dσ = (x − D_T(x, σ))/σ
           from σ to σ'                                          (2 teacher evaluations)
    target = f_θ⁻(x_σ', σ')      (θ⁻: the EMA target network, method state, no gradient)
    loss   = d(f_θ(x_σ, σ), target),  d = L2 (mean over pixels) or pseudo-Huber
             sqrt(||a − b||² + c²) − c with c = 0.00054 √(H·W·C) (Song & Dhariwal 2023)

f is the consistency parameterisation with f(x, σ_min) = x exactly (`edm.consistency_c_skip`,
the 'consistency' flag of `denoiser_model`'s inputs); θ and θ⁻ start as the EDM teacher's network. After each
optimizer step θ⁻ ← μ θ⁻ + (1 − μ) θ (`update_after_step`).

Defaults from Song et al. 2023, Table 3 (CD on CIFAR-10, Heun teacher step): N = 18, μ = 0.95;
uniform weight λ ≡ 1 (their `weight_schedule='uniform'` for CD); L2 instead of LPIPS (no network
download; `distance='pseudo_huber'` is the LPIPS-free metric of Song & Dhariwal 2023). Official
code: openai/consistency_models, `cm/karras_diffusion.py` `consistency_losses` (indices, t, t2,
`heun_solver`, `target_model`), `cm/train_util.py` (target EMA). Sampling: 1 step f(σ_max · z),
or multistep (`sampling.py` 'consistency'). The paper evaluates a separate slow EMA of θ
(rate 0.9999); here θ itself is evaluated.
"""

import ml_collections

import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.diffusion import denoiser_model, edm, sampling
from kdjax.diffusion.methods import common
from kdjax.losses import self_distillation as sd_losses
from kdjax.methods import base

DISTANCES = ("l2", "pseudo_huber")


def heun_step(denoise, x, sigma, sigma_next):
  """One Heun step of dx/dσ = (x − D(x, σ))/σ with per-example σ, σ_next [b] (σ_next > 0)."""
  s, s_next = common.broadcast(sigma, x), common.broadcast(sigma_next, x)
  slope = (x - denoise(x, sigma)) / s
  x_euler = x + (s_next - s) * slope
  slope_next = (x_euler - denoise(x_euler, sigma_next)) / s_next
  return x + (s_next - s) * 0.5 * (slope + slope_next)


def consistency_target(teacher_denoise, target_function, x_sigma, sigma, sigma_next):
  """f_θ⁻(Heun_T(x_σ, σ → σ'), σ'): the consistency distillation target."""
  return target_function(heun_step(teacher_denoise, x_sigma, sigma, sigma_next), sigma_next)


class Consistency(base.Method):
  """Consistency distillation; see the module docstring for the formulas and defaults."""
  name = "consistency"
  family = "diffusion"
  paper = "Song et al. 2023"
  field_help = {
      "num_scales": "N, the points of EDM's sigma grid the teacher's Heun steps join",
      "target_ema": "mu, the EMA rate of the target network",
      "distance": "'l2' or 'pseudo_huber', the distance between student and target",
      "sample_steps": "the step counts the evaluation samples with",
      "eval_samples": "fixed-noise samples the final FD, precision, recall are measured on",
  }
  teacher_needs = base.TeacherNeeds(kind="one", on_batch_inputs=False)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(num_scales=18, target_ema=0.95, distance="l2",
                                          sample_steps=(1, 2, 4),
                                          eval_samples=1000))

  def __init__(self, config):
    super().__init__(config)
    validation.require(config.eval_samples, validation.POSITIVE_INT,
                       f"config.{self.name}.eval_samples")
    validation.require(config.num_scales, validation.POSITIVE_INT,
                       "config.consistency.num_scales")
    if config.num_scales < 2:
      raise validation.ConfigError(
          f"config.consistency.num_scales={config.num_scales}: at least 2 grid points.")
    base.check_interval(config, self.name, "target_ema", 0.0, 1.0)
    validation.one_of("config.consistency.distance", config.distance, DISTANCES)

  def sampling(self):
    return tuple(("consistency", int(k)) for k in self.config.sample_steps)

  def final_metrics(self, student_apply, student_variables):
    """Sample quality at each `sampling()` setting beside the teacher's at the same NFE
    (`quality.final_metrics`)."""
    from kdjax.diffusion import quality  # pylint: disable=g-import-not-at-top
    return quality.final_metrics(student_apply, student_variables, self.sampling(),
                                 num_samples=self.config.eval_samples)

  def init(self, rng, sample):
    del rng
    if sample.student_variables is None:
      raise ValueError("consistency starts its EMA target from the student's initial "
                       "variables; pass them as Batch.student_variables to init (the run does).")
    return {}, {"target": jax.tree.map(lambda x: jnp.array(x, copy=True),
                                       sample.student_variables)}

  def update_after_step(self, state, student_variables, step, *, method_params):
    del step, method_params
    student = {key: student_variables[key] for key in state["target"]}
    return dict(state, target=sd_losses.ema_update(state["target"], student,
                                                   self.config.target_ema))

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del ops, step
    images, labels = batch["inputs"], batch["labels"]
    keys = common.per_example_keys(rng, batch["index"])
    index_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    grid = edm.karras_sigmas(self.config.num_scales)[:-1]  # σ_max ... σ_min, no final 0.
    n = common.per_example_uniform_int(index_keys, 0, self.config.num_scales - 1)
    sigma, sigma_next = grid[n], grid[n + 1]
    x_sigma = images + common.broadcast(sigma, images) * common.per_example_normal(
        noise_keys, images.shape[1:])
    teacher = sampling.model_denoiser(models.teacher_apply, models.teacher_variables, labels)
    target_function = sampling.model_denoiser(models.student_apply, state["target"], labels,
                                      consistency=True)
    target = consistency_target(teacher, target_function, x_sigma, sigma, sigma_next)
    return dict(batch, inputs=denoiser_model.model_inputs(x_sigma, sigma, labels,
                                                                 consistency=True),
                **{common.TARGET_KEY: jax.lax.stop_gradient(target),
                   common.WEIGHT_KEY: jnp.ones_like(sigma)}), state

  def loss(self, params, state, batch, ops):
    del params
    student = common.student_image(batch)
    target, weight = common.target_and_weight(batch)
    if self.config.distance == "l2":
      per_example = common.mean_square(student, target)
    else:
      per_example = common.pseudo_huber(student, target, 0.00054 * float(target[0].size) ** 0.5)
    loss = ops.mean(weight * per_example, batch.where)
    return loss, {"loss": loss}, state


METHODS = (Consistency,)
