"""MEAL V2: averaged soft labels of several teachers plus an adversarial discriminator
(Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
without Tricks", 2020; official code szq0214/MEAL-V2@c848006).

The target is the teachers' averaged probabilities `p_t = mean_n softmax(t_n)`; the student
learns it by KL alone (no hard labels: `ce_weight` 0; the official `KLLoss` is the cross-entropy
`-sum p_t log p_s`, which differs from `KL(p_t || p_s)` by the teachers' entropy, a constant, so
gradients are equal). A discriminator on the logits (three dense layers of widths C/K, C/K^2 and
2, ReLU after each as `models/discriminator.py`, K = `discriminator_reduction` = 8) learns to tell
the student's logits (target [1, 0]) from the teachers' averaged logits (target [0, 1]) with
`BCEWithLogits` averaged over both halves and both outputs (`loss.py: discriminatorLoss`). The
discriminator is a method parameter trained with the student in the same step and optimizer.

`reverse_gradient` (default True, the paper's adversarial game): the student receives the
discriminator loss's gradient reversed (a gradient-reversal layer on its logits, as CTKD), so it
learns to fool the discriminator. With False, the student gets the same-sign gradient, which is
what the official `train.py` does (`loss = g_loss + d_loss`, one backward, nothing reversed).
Hidden widths are floored at `min_width` (16) so that 10- or 100-class problems keep a usable
discriminator (C/K^2 is 0 for 10 classes); for 1000 classes the official widths are 125 and 15:
set `min_width=1` to get exactly those.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import losses, validation
from kdjax.methods import base
from kdjax.methods.ctkd import gradient_reversal


class Discriminator(nn.Module):
  """[b, C] logits -> [b, 2] scores: Dense(C/K) ReLU Dense(C/K^2) ReLU Dense(2) ReLU."""
  widths: tuple

  @nn.compact
  def __call__(self, logits):
    x = logits
    for width in self.widths + (2,):
      x = nn.relu(nn.Dense(width)(x))
    return x


class MealV2(base.Method):
  """`ce_weight * CE + kd_weight * KL(mean_n p_t_n || p_s) + discriminator_weight * D-loss`."""
  name = "meal_v2"
  family = "logit"
  paper = "Shen & Savvides 2020"
  field_help = {
      "kd_weight": "weight of the KL to the teachers' averaged probabilities",
      "discriminator_weight": "weight of the discriminator's loss",
      "discriminator_reduction": "K: the discriminator's widths are C/K and C/K^2",
      "min_width": "floor on the discriminator's hidden widths",
      "reverse_gradient": "True: the student gets the discriminator's gradient reversed",
  }
  teacher_needs = base.TeacherNeeds(kind="ensemble")
  non_negative_fields = ("ce_weight", "kd_weight", "discriminator_weight")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=0.0, kd_weight=1.0, discriminator_weight=1.0, discriminator_reduction=8,
        min_width=16, reverse_gradient=True))

  def __init__(self, config):
    super().__init__(config)
    base.check_positive_int(config, self.name, "discriminator_reduction")
    base.check_positive_int(config, self.name, "min_width")
    if not isinstance(config.reverse_gradient, bool):
      raise validation.ConfigError(
          f"config.{self.name}.reverse_gradient must be True or False, got "
          f"{config.reverse_gradient!r}.")

  def _discriminator(self, num_classes: int) -> Discriminator:
    k, floor = self.config.discriminator_reduction, self.config.min_width
    return Discriminator(widths=(max(num_classes // k, floor),
                                 max(num_classes // k**2, floor)))

  def init(self, rng, sample):
    logits = sample.student.logits
    return {"discriminator": self._discriminator(logits.shape[-1]).init(
        rng, logits)["params"]}, {}

  def loss(self, params, state, batch, ops):
    c = self.config
    teacher_logits = batch.teacher.logits.astype(jnp.float32)
    if teacher_logits.ndim != batch.student.logits.ndim + 1:
      raise ValueError(f"Method {self.name!r} needs the teachers' logits stacked as "
                       f"[N_teachers, b, C], got {tuple(teacher_logits.shape)}.")
    student_logits = base.mask_rows(batch.student.logits.astype(jnp.float32), batch.where)
    teacher_logits = jax.vmap(lambda t: base.mask_rows(t, batch.where))(teacher_logits)
    # log of the averaged probabilities: a valid logit vector for the KL.
    averaged_log_probs = (jax.nn.logsumexp(jax.nn.log_softmax(teacher_logits), axis=0)
                          - jnp.log(teacher_logits.shape[0]))
    kl = ops.mean(losses.forward_kl(student_logits, averaged_log_probs, where=batch.where),
                  batch.where)

    discriminator = self._discriminator(student_logits.shape[-1])
    student_input = (gradient_reversal(student_logits, jnp.float32(1.0))
                     if c.reverse_gradient else student_logits)
    fake = discriminator.apply({"params": params["discriminator"]}, student_input)
    real = discriminator.apply({"params": params["discriminator"]},
                               jnp.mean(teacher_logits, axis=0))
    fake_target = jnp.broadcast_to(jnp.array([1.0, 0.0]), fake.shape)
    per_example = 0.25 * (jnp.sum(optax.sigmoid_binary_cross_entropy(fake, fake_target), -1)
                          + jnp.sum(optax.sigmoid_binary_cross_entropy(real, 1 - fake_target),
                                    -1))
    discriminator_loss = ops.mean(per_example, batch.where)
    told_apart = 0.5 * ((jnp.argmax(fake, -1) == 0).astype(jnp.float32)
                        + (jnp.argmax(real, -1) == 1).astype(jnp.float32))
    ce = base.cross_entropy(batch, ops)
    loss = c.ce_weight * ce + c.kd_weight * kl + c.discriminator_weight * discriminator_loss
    return loss, {"loss": loss, "ce": ce, "kd": kl, "discriminator": discriminator_loss,
                  "discriminator_accuracy": ops.mean(told_apart, batch.where),
                  "accuracy": base.accuracy(batch, ops)}, state


METHODS = (MealV2,)
