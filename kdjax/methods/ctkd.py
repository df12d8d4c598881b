"""CTKD: KD with a learnable temperature trained adversarially through gradient reversal."""

import math

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.methods import base


@jax.custom_vjp
def gradient_reversal(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the incoming gradient by `-scale` backwards
  (Ganin & Lempitsky 2015). `scale` gets no gradient."""
  del scale
  return x


def _gradient_reversal_fwd(x, scale):
  return x, scale


def _gradient_reversal_bwd(scale, g):
  return -scale * g, jnp.zeros_like(scale)


gradient_reversal.defvjp(_gradient_reversal_fwd, _gradient_reversal_bwd)


def cosine_curriculum(step: jax.Array, *, low: float, high: float,
                      num_steps: int) -> jax.Array:
  """`low + (high - low) * (1 - cos(pi * min(step, num_steps) / num_steps)) / 2`:
  `low` at step 0, rising along a half cosine to `high` at `num_steps`, then constant
  (`num_steps=0`: `high` from the first step, no curriculum)."""
  if num_steps == 0:
    return jnp.full(jnp.shape(step), high, jnp.float32)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32), num_steps) / num_steps
  return low + (high - low) * 0.5 * (1.0 - jnp.cos(math.pi * progress))


class CTKD(base.Method):
  """Curriculum Temperature KD (Li et al., AAAI 2023), global-temperature variant:
  `ce_weight * CE + kd_weight * losses.kd(s, t, temperature=T)` with a learnable `T`.

  `T = temperature_min + temperature_range * sigmoid(GRL(theta, lambda))`, `theta` a scalar
  trainable parameter (`params['temperature_logit']`, trained with the student by the same
  optimizer). The gradient-reversal layer GRL is the identity forward and multiplies the
  gradient by `-lambda` backward, so the student descends the KD loss while `T` ascends it
  (the temperature makes the task progressively harder). `lambda` follows a cosine curriculum
  from `lambda_min` to `lambda_max` over `curriculum_steps` optimizer steps.

  Defaults from the official code (zhengli97/CTKD): `models/temp_global.py` (`Global_T`,
  `theta` initialised to 1), `helper/loops.py` (`temp = t_start + t_end * sigmoid(theta)`),
  `train_student.py` (`CosineDecay`) and `scripts/run_cifar_distill.sh` (`-r 0.1 -a 0.9`,
  `--t_start 1 --t_end 20`, `--decay_max 0 --decay_min -1 --decay_loops 10`). So CE 0.1,
  KD 0.9, `T` in (1, 21) starting at `1 + 20 * sigmoid(1) = 15.62`, and a GRL scale going
  0 -> -1 over 10 epochs; the official GRL multiplies by that (negative) value, here written
  as `-lambda` with `lambda` 0 -> 1. The official curriculum counts epochs (from epoch 1);
  here it counts steps: `curriculum_steps = 7820` is 10 epochs of CIFAR-100 at batch 64
  (782 steps each). Set it to about 1/24 of the run (10 of 240 epochs) for other recipes.
  """
  name = "ctkd"
  family = "logit"
  paper = "Li et al. 2023"
  field_help = {
      "curriculum_steps": "steps of the cosine curriculum of the gradient-reversal scale lambda",
      "lambda_min": "gradient-reversal scale at step 0",
      "lambda_max": "gradient-reversal scale at the end of the curriculum",
      "temperature_logit_init": "initial value of the learnable temperature logit theta",
      "temperature_min": "lowest temperature: T = temperature_min + temperature_range * "
                         "sigmoid(theta)",
      "temperature_range": "width of the temperature's range above temperature_min",
  }
  teacher_needs = base.TeacherNeeds(cache="topk")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=0.1, kd_weight=0.9, temperature_min=1.0, temperature_range=20.0,
        temperature_logit_init=1.0, lambda_min=0.0, lambda_max=1.0, curriculum_steps=7820))

  non_negative_fields = ("ce_weight", "kd_weight", "lambda_min", "lambda_max")
  positive_fields = ("temperature_min", "temperature_range")

  def __init__(self, config):
    super().__init__(config)
    base.check_number(config, self.name, "temperature_logit_init")
    # 0 is allowed (no curriculum): configs derive it from num_steps, which can be small.
    base.check_non_negative_int(config, self.name, "curriculum_steps")
    if config.lambda_max < config.lambda_min:
      raise ValueError(f"config.{self.name}.lambda_max={config.lambda_max!r} must be >= "
                       f"config.{self.name}.lambda_min={config.lambda_min!r}.")

  def init(self, rng, sample):
    del rng, sample
    return {"temperature_logit": jnp.asarray(self.config.temperature_logit_init,
                                             jnp.float32)}, {}

  def grl_lambda(self, step: jax.Array) -> jax.Array:
    c = self.config
    return cosine_curriculum(step, low=c.lambda_min, high=c.lambda_max,
                             num_steps=c.curriculum_steps)

  def temperature(self, params, step: jax.Array) -> jax.Array:
    """The temperature used at `step`, with the gradient reversal on its parameter."""
    c = self.config
    theta = gradient_reversal(params["temperature_logit"], self.grl_lambda(step))
    return c.temperature_min + c.temperature_range * jax.nn.sigmoid(theta)

  def loss(self, params, state, batch, ops):
    c = self.config
    temperature = self.temperature(params, batch.step)
    ce = base.cross_entropy(batch, ops)
    kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                            temperature=temperature, where=batch.where), batch.where)
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd, "temperature": temperature,
                  "ctkd_lambda": self.grl_lambda(batch.step),
                  "accuracy": base.accuracy(batch, ops)}, state

METHODS = (CTKD,)
