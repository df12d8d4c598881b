"""Progressive distillation (Salimans & Ho, ICLR 2022, arXiv:2202.00512, Algorithm 2).

Round k halves the sampler: a teacher sampled with N = `teacher_steps` / 2^(k−1) DDIM steps
teaches a student to take N/2 steps, one student step for two teacher steps. Per example
(x, c) of the data:

    i ~ U{1, ..., N/2},  t = t_max · i / (N/2),  t' = t − t_max/N,  t'' = t − 2 t_max/N
    ε ~ N(0, I),  z_t = α_t x + σ_t ε                       (VP cosine schedule, `vp.py`)
    z_t'  = α_t' x̂_T(z_t, t)  + (σ_t'/σ_t)(z_t − α_t x̂_T(z_t, t))       (teacher DDIM)
    z_t'' = α_t'' x̂_T(z_t', t') + (σ_t''/σ_t')(z_t' − α_t' x̂_T(z_t', t'))
    x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)            (target: one
          student DDIM step from z_t lands on z_t'')
    loss = max(α_t²/σ_t², 1) · mean_pixels (x̂_S(z_t, t) − x̃)²         (truncated SNR weight)

`progressive_target` computes x̃ (tests check it against two DDIM steps of an exact
Gaussian denoiser). Times run from t_max = t(σ_max = 80) ≈ 0.992, not 1: the EDM teacher is
conditioned on σ = tan(π t/2), infinite at t = 1; the DDIM sampler (`sampling.py` 'ddim')
uses the same grid, so student step i is exactly the pair of teacher steps it learned.
Parameterisation: the student is the teacher's architecture with EDM's preconditioning,
which is v-prediction for σ_d = 1 (`denoiser_model`), started from the shipped teacher.

Rounds are suite generations (`generations_field = 'rounds'`, the born-again chain):
`progressive_1` is taught by the suite's teacher at `teacher_steps`, `progressive_k` by
`progressive_{k−1}`'s checkpoint at `teacher_steps / 2^(k−1)` steps. Defaults: 8 → 4 → 2 → 1
(3 rounds; the paper starts from 1024 or 8192 steps, far beyond a CPU budget), loss weight
truncated SNR (the paper's choice for distillation, Sec. 4 / App. D). Official code:
google-research/diffusion_distillation (`diffusion_distillation/dpm.py`,
`Model.training_losses` with `num_steps`-based `u` and the `target` of `_run_model`).
"""

import math
import ml_collections

import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.diffusion import denoiser_model, sampling, vp
from kdjax.diffusion.methods import common
from kdjax.methods import base

# In plain Python: a jnp call at import would start JAX's backend, which must not happen
# before `jax.distributed.initialize` (multi-host runs import the methods first).
T_MAX = 2.0 / math.pi * math.atan(80.0)  # vp.t_from_edm_sigma(80.0)


def ddim_step(predict_x0, z, t, t_next):
  """One DDIM (η = 0) step with per-example times t, t_next [b] (0 ≤ t_next < t ≤ t_max)."""
  x0 = predict_x0(z, t)
  t_b, t_next_b = common.broadcast(t, z), common.broadcast(t_next, z)
  eps = (z - vp.alpha(t_b) * x0) / vp.sigma(t_b)
  return vp.alpha(t_next_b) * x0 + vp.sigma(t_next_b) * eps


def progressive_target(predict_x0, z_t, t, step):
  """x̃: the image whose single DDIM step from (z_t, t) lands where two teacher DDIM steps of
  size `step` (t → t − step → t − 2·step) land. predict_x0(z [b, ...], t [b]) -> x̂."""
  t_mid, t_end = t - step, t - 2.0 * step
  z_mid = ddim_step(predict_x0, z_t, t, t_mid)
  z_end = ddim_step(predict_x0, z_mid, t_mid, t_end)
  t_b, t_end_b = common.broadcast(t, z_t), common.broadcast(t_end, z_t)
  ratio = vp.sigma(t_end_b) / vp.sigma(t_b)
  return (z_end - ratio * z_t) / (vp.alpha(t_end_b) - ratio * vp.alpha(t_b))


class Progressive(base.Method):
  """Progressive distillation; see the module docstring for the formulas and defaults."""
  name = "progressive"
  family = "diffusion"
  paper = "Salimans & Ho 2022"
  field_help = {
      "teacher_steps": "DDIM steps of the first round's teacher (each round halves them)",
      "rounds": "in a suite, how many halving rounds to train (each the next one's teacher)",
      "eval_samples": "fixed-noise samples the final FD, precision, recall are measured on",
  }
  teacher_needs = base.TeacherNeeds(kind="one", on_batch_inputs=False)
  generations_field = "rounds"
  student_starts_from_teacher = True  # Algorithm 2: each round's student is its teacher's copy.

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(teacher_steps=8, rounds=3, eval_samples=1000))

  def __init__(self, config):
    super().__init__(config)
    validation.require(config.eval_samples, validation.POSITIVE_INT,
                       f"config.{self.name}.eval_samples")
    validation.require(config.teacher_steps, validation.POSITIVE_INT,
                       "config.progressive.teacher_steps")
    validation.require(config.rounds, validation.POSITIVE_INT, "config.progressive.rounds")
    if config.teacher_steps % (2 ** config.rounds):
      raise validation.ConfigError(
          f"config.progressive.teacher_steps={config.teacher_steps} must be divisible by "
          f"2^rounds = {2 ** config.rounds} (each round halves the steps).")

  @property
  def round_teacher_steps(self) -> int:
    """The teacher's DDIM steps in this round (this run is generation `rounds`)."""
    return self.config.teacher_steps // 2 ** (self.config.rounds - 1)

  @property
  def student_steps(self) -> int:
    return self.round_teacher_steps // 2

  def sampling(self):
    """(sampler, steps) the student is evaluated with."""
    return (("ddim", self.student_steps),)

  def final_metrics(self, student_apply, student_variables):
    """Sample quality at each `sampling()` setting beside the teacher's at the same NFE
    (`quality.final_metrics`)."""
    from kdjax.diffusion import quality  # pylint: disable=g-import-not-at-top
    return quality.final_metrics(student_apply, student_variables, self.sampling(),
                                 num_samples=self.config.eval_samples)

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del ops, step
    images, labels = batch["inputs"], batch["labels"]
    keys = common.per_example_keys(rng, batch["index"])
    time_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    student_steps = self.student_steps
    i = common.per_example_uniform_int(time_keys, 1, student_steps + 1)
    t = T_MAX * i.astype(jnp.float32) / student_steps
    noise = common.per_example_normal(noise_keys, images.shape[1:])
    z_t = vp.diffuse(images, noise, t)
    teacher = sampling.model_denoiser(models.teacher_apply, models.teacher_variables, labels)
    target = progressive_target(vp.x0_predictor_from_edm(teacher), z_t, t,
                                T_MAX / (2 * student_steps))
    alpha_t = common.broadcast(vp.alpha(t), z_t)
    sigma_edm = vp.edm_sigma(t)
    return dict(batch, inputs=denoiser_model.model_inputs(z_t / alpha_t, sigma_edm, labels),
                **{common.TARGET_KEY: jax.lax.stop_gradient(target),
                   common.WEIGHT_KEY: vp.truncated_snr_weight(t)}), state

  def loss(self, params, state, batch, ops):
    del params
    target, weight = common.target_and_weight(batch)
    per_example = weight * common.mean_square(common.student_image(batch), target)
    loss = ops.mean(per_example, batch.where)
    return loss, {"loss": loss}, state


METHODS = (Progressive,)
