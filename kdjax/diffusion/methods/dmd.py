"""Distribution matching distillation (Yin et al., CVPR 2024, arXiv:2311.18828): a one-step
generator G(z, c) = D_S(σ_max z, σ_max, c) (the student, started from the teacher) trained with

  * the distribution matching gradient: x = G(z), σ from EDM's grid of 1000 points (ρ = 7)
    at an index uniform in [20, 980) (DMD/DMD2's t ∈ [0.02 T, 0.98 T]), x_σ = sg(x) + σ ε,
        g = (D_fake(x_σ, σ) − D_real(x_σ, σ)) / mean_pixels |x − D_real(x_σ, σ)|
    (DMD eq. 7-8: the score difference s_fake − s_real, since s(x_σ) = (D(x_σ) − x_σ)/σ²,
    normalised per example as DMD2's `compute_distribution_matching_loss`), and the loss
        L_dm = 0.5 · mean_pixels (x − sg(x − g))²,   whose gradient in x is g / (H·W·C);
  * DMD's regression loss on pairs (z_ref, y_ref) with y_ref the teacher's ODE solution
    (EDM Heun, 18 steps) from z_ref, made once before the first step (`pregenerate`; method
    state) with their own seed: L_reg = mean_pixels (G(z_ref) − y_ref)² (L2 in place of the
    paper's LPIPS, which needs a network download), weight `regression_weight` = 0.25 (DMD
    Sec. 4, λ_reg);
  * the fake score network D_fake (method params, an EDM denoiser started from the teacher)
    trained in the same step by EDM's denoising loss on sg(x) (the loss the teacher was
    trained with; ln σ ~ N(−1.2, 1.2²), λ(σ) = 1/c_out²), weight `fake_weight`.

D_real is the frozen teacher. The rewrite (no gradient) runs G once to get x (the same value
the graded forward of the step computes), the teacher and the fake network on x_σ, and writes
g; the fake network's variables as of this step are read from a copy in method state that
`update_after_step` refreshes (a batch rewrite sees no method params). The student runs on
[b generator inputs; b regression inputs] in one forward pass.

This is DMD (with the regression loss), not DMD2's two-time-scale update without it. Defaults:
DMD's λ_reg = 0.25, the guidance range [0.02, 0.98]; no classifier-free guidance (scale 1).
Official code: tianweiy/DMD2 (`main/edm/edm_guidance.py`: `compute_distribution_matching_loss`,
`compute_loss_fake`), whose EDM variant this follows.
"""

import ml_collections
import numpy as np

import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.diffusion import denoiser_model, digits, edm, sampling
from kdjax.diffusion.methods import common
from kdjax.methods import base

SIGMA_MAX = 80.0
PAIRS_SEED_OFFSET = 7_000_000  # Regression noise never equals the evaluation's fixed noise.


def distribution_matching_gradient(x, real, fake):
  """g = (fake − real) / mean_pixels |x − real| per example (DMD2's normalisation)."""
  scale = jnp.mean(jnp.abs(x - real), axis=tuple(range(1, x.ndim)), keepdims=True)
  return jnp.nan_to_num((fake - real) / scale)


def distribution_matching_loss(x, gradient):
  """[b]: 0.5 · mean_pixels (x − sg(x − g))²; d/dx = g / (pixels per example)."""
  return 0.5 * common.mean_square(x, jax.lax.stop_gradient(x - gradient))


class DMD(base.Method):
  """Distribution matching distillation; see the module docstring."""
  name = "dmd"
  family = "diffusion"
  paper = "Yin et al. 2024"
  field_help = {
      "dm_weight": "weight of the distribution-matching loss",
      "regression_weight": "weight of the regression loss on the teacher's ODE pairs",
      "fake_weight": "weight of the fake score network's denoising loss",
      "num_pairs": "(noise, teacher ODE solution) pairs made before the first step",
      "pair_steps": "Heun steps of the teacher's ODE solve for the pairs",
      "num_train_timesteps": "points of the sigma grid the noise level is drawn from",
      "min_step": "lowest grid index drawn (0.02 of the grid in DMD)",
      "max_step": "highest grid index drawn, exclusive (0.98 of the grid in DMD)",
      "eval_samples": "fixed-noise samples the final FD, precision, recall are measured on",
  }
  teacher_needs = base.TeacherNeeds(kind="one", on_batch_inputs=False)
  non_negative_fields = ("regression_weight", "fake_weight", "dm_weight")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        dm_weight=1.0, regression_weight=0.25, fake_weight=1.0, num_pairs=1000,
        min_step=20, max_step=980, num_train_timesteps=1000, pair_steps=18,
        eval_samples=1000))

  def __init__(self, config):
    super().__init__(config)
    validation.require(config.eval_samples, validation.POSITIVE_INT,
                       f"config.{self.name}.eval_samples")
    for field in ("num_pairs", "num_train_timesteps", "pair_steps"):
      validation.require(config[field], validation.POSITIVE_INT, f"config.dmd.{field}")
    if not 0 <= config.min_step < config.max_step <= config.num_train_timesteps:
      raise validation.ConfigError(
          f"config.dmd.min_step={config.min_step}, max_step={config.max_step}: need 0 <= "
          f"min_step < max_step <= num_train_timesteps={config.num_train_timesteps}.")

  def sampling(self):
    return (("euler", 1),)

  def final_metrics(self, student_apply, student_variables):
    """Sample quality at each `sampling()` setting beside the teacher's at the same NFE
    (`quality.final_metrics`)."""
    from kdjax.diffusion import quality  # pylint: disable=g-import-not-at-top
    return quality.final_metrics(student_apply, student_variables, self.sampling(),
                                 num_samples=self.config.eval_samples)

  def _fake_module(self):
    return denoiser_model.DigitsDenoiser()

  def init(self, rng, sample):
    del rng
    if sample.teacher_variables is None:
      raise ValueError("dmd starts its fake score network from the teacher's variables; "
                       "build it with a teacher (the run does).")
    fake = jax.tree.map(lambda x: jnp.array(x, copy=True), sample.teacher_variables)
    shape = (self.config.num_pairs,) + digits.IMAGE_SHAPE
    state = {"fake": jax.tree.map(lambda x: jnp.array(x, copy=True), fake),
             "pair_noise": jnp.zeros(shape, jnp.float32),
             "pair_images": jnp.zeros(shape, jnp.float32),
             "pair_labels": jnp.zeros(shape[:1], jnp.int32)}
    return {"fake": fake}, state

  def pregenerate(self, state, pipeline, *, teacher_apply, teacher_variables, seed):
    """The regression pairs: noise z_ref (seeded), labels i % 10, y_ref = the teacher's Heun
    solution from z_ref (`pair_steps` steps), computed once (host arrays)."""
    from kdjax.diffusion import sampling  # pylint: disable=g-import-not-at-top
    del pipeline
    count = self.config.num_pairs
    key = jax.random.PRNGKey(seed + PAIRS_SEED_OFFSET)
    noise = jax.random.normal(key, (count,) + digits.IMAGE_SHAPE)
    labels = jnp.arange(count, dtype=jnp.int32) % digits.NUM_CLASSES
    solve = jax.jit(lambda variables, noise, labels: sampling.sample(
        teacher_apply, variables, noise, labels, sampler="heun",
        num_steps=self.config.pair_steps))
    images = np.concatenate([np.asarray(solve(teacher_variables, noise[i:i + 500],
                                              labels[i:i + 500]))
                             for i in range(0, count, 500)])
    return dict(state, pair_noise=np.asarray(noise), pair_images=images,
                pair_labels=np.asarray(labels))

  def update_after_step(self, state, student_variables, step, *, method_params):
    del student_variables, step
    return dict(state, fake=method_params["fake"])

  def _sigma_grid(self):
    return edm.karras_sigmas(self.config.num_train_timesteps)[:-1]

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del ops, step
    c = self.config
    labels, index = batch["labels"], batch["index"]
    keys = common.per_example_keys(rng, index)
    noise_keys, time_keys, diffuse_keys = jax.vmap(
        lambda key: jax.random.split(key, 3), out_axes=1)(keys)
    shape = batch["inputs"].shape[1:]
    z = common.per_example_normal(noise_keys, shape)
    sigma_max = jnp.full(labels.shape, SIGMA_MAX, jnp.float32)
    generator_inputs = denoiser_model.model_inputs(SIGMA_MAX * z, sigma_max, labels)
    x = sampling.model_denoiser(models.student_apply, models.student_variables, labels)(
        SIGMA_MAX * z, sigma_max)
    sigma = self._sigma_grid()[common.per_example_uniform_int(time_keys, c.min_step,
                                                               c.max_step)]
    x_sigma = x + common.broadcast(sigma, x) * common.per_example_normal(diffuse_keys, shape)
    real = sampling.model_denoiser(models.teacher_apply, models.teacher_variables, labels)(x_sigma, sigma)
    fake = sampling.model_denoiser(_fake_apply(), state["fake"], labels)(x_sigma, sigma)
    gradient = distribution_matching_gradient(x, real, fake)
    pair = index % c.num_pairs
    pair_inputs = denoiser_model.model_inputs(SIGMA_MAX * state["pair_noise"][pair], sigma_max,
                                              state["pair_labels"][pair])
    inputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), generator_inputs, pair_inputs)
    rewritten = dict(batch, inputs=inputs, labels=jnp.concatenate([labels, labels]),
                     dmd_generated=jax.lax.stop_gradient(x),
                     dmd_gradient=jax.lax.stop_gradient(gradient),
                     dmd_pair_images=state["pair_images"][pair])
    if "mask" in batch:
      rewritten["mask"] = jnp.concatenate([batch["mask"], batch["mask"]])
    return rewritten, state

  def loss(self, params, state, batch, ops):
    c = self.config
    images = common.student_image(batch)
    half = images.shape[0] // 2
    where = batch.where[:half]
    generated, regressed = images[:half], images[half:]
    # Absent only when the loss is traced alone (the run's shape check skips the rewrite).
    data = {"dmd_gradient": jnp.zeros_like(generated), "dmd_pair_images": regressed,
            "dmd_generated": generated, "index": jnp.arange(half), **batch.data}
    dm = ops.mean(distribution_matching_loss(generated, data["dmd_gradient"]), where)
    regression = ops.mean(common.mean_square(regressed, data["dmd_pair_images"]), where)
    # The fake score network learns the generator's current distribution (EDM's loss on sg(x)).
    rng = batch.rng if batch.rng is not None else jax.random.PRNGKey(0)
    keys = common.per_example_keys(jax.random.fold_in(rng, 2), data["index"])
    fake_loss = ops.mean(_edm_denoising_loss(
        _fake_apply(), params["fake"], jax.lax.stop_gradient(data["dmd_generated"]), keys,
        batch.labels[:half]), where)
    loss = c.dm_weight * dm + c.regression_weight * regression + c.fake_weight * fake_loss
    return loss, {"loss": loss, "dm": dm, "regression": regression, "fake_score": fake_loss}, state


def _edm_denoising_loss(apply, variables, images, keys, labels):
  """EDM's per-example denoising loss [b] of a denoiser *model* (preconditioning inside it);
  keys [b]: one per example (device-count independent)."""
  config = edm.EDMConfig(sigma_data=digits.SIGMA_DATA)
  sigma_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  sigma = jax.vmap(lambda key: edm.sample_training_sigma(
      key, (), p_mean=config.p_mean, p_std=config.p_std))(sigma_keys)
  noisy = images + common.broadcast(sigma, images) * common.per_example_normal(
      noise_keys, images.shape[1:])
  denoised = sampling.model_denoiser(apply, variables, labels)(noisy, sigma)
  return edm.loss_weight(sigma, config.sigma_data) * common.mean_square(denoised, images)


_FAKE_APPLY = []


def _fake_apply():
  """The fake score network's apply function (an EDM denoiser model), built once."""
  if not _FAKE_APPLY:
    from kdjax.models.adapters import from_linen  # pylint: disable=g-import-not-at-top
    _FAKE_APPLY.append(from_linen(denoiser_model.DigitsDenoiser()).apply)
  return _FAKE_APPLY[0]


METHODS = (DMD,)
