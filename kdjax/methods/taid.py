"""TAID: distillation towards a student-teacher interpolation that moves to the teacher."""

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.methods import base


def _interpolated_target_entropy(student_logits, teacher_logits, t, where):
  """Entropy of TAID's target `softmax((1 - t) z_s + t z_t)` (no gradient is needed)."""
  s = base.mask_rows(student_logits.astype(jnp.float32), where)
  teacher = base.mask_rows(teacher_logits.astype(jnp.float32), where)
  # The same zero-weight guards as losses.taid, so -inf vocabulary entries stay finite.
  log_target = jax.nn.log_softmax(
      jnp.where(t == 1, 0.0, (1 - t) * s) + jnp.where(t == 0, 0.0, t * teacher), axis=-1)
  target = jnp.exp(log_target)
  return -jnp.sum(jnp.where(target > 0, target * log_target, 0.0), axis=-1)


def taid_update(state, loss, step, *, t_start, t_end, alpha, beta, num_train_steps,
                adaptive=True):
  """One step of TAID's adaptive schedule; `loss` is the step's (global, scalar) loss.

  From the official `TAID.update_t` (SakanaAI/TAID, `src/distil_losses/taid.py`):

      if prev_loss is inf:                    # first step: only remember the loss
          prev_loss = loss; return
      relative_change = (prev_loss - loss) / (prev_loss + 1e-15)
      momentum = beta * momentum + (1 - beta) * relative_change
      delta = alpha * sigmoid(momentum) * (1 - t)
      t_target = t_start + (t_end - t_start) * step / num_train_steps
      t = min(t_end, max(t_target, t + delta))   # adaptive=False: t = t_target
      prev_loss = loss

  `t` never decreases: the linear schedule is a floor and the adaptive step is >= 0.
  """
  t, prev_loss, momentum = state["t"], state["prev_loss"], state["momentum"]
  loss = loss.astype(jnp.float32)
  first = jnp.isinf(prev_loss)
  relative_change = (prev_loss - loss) / (prev_loss + 1e-15)
  new_momentum = beta * momentum + (1 - beta) * relative_change
  delta = alpha * jax.nn.sigmoid(new_momentum) * (1 - t)
  t_target = t_start + (t_end - t_start) * jnp.asarray(step, jnp.float32) / num_train_steps
  new_t = jnp.minimum(t_end, jnp.maximum(t_target, t + delta)) if adaptive else t_target
  return {
      "t": jnp.where(first, t, new_t).astype(jnp.float32),
      "prev_loss": loss,
      "momentum": jnp.where(first, momentum, new_momentum).astype(jnp.float32),
  }


class TAID(base.Method):
  """TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
  Knowledge Transfer in Language Models", ICLR 2025):
  `ce_weight * CE + taid_weight * losses.taid(s, t, t=state['t'])`.

  The interpolation coefficient `t` starts at `t_start` and moves towards `t_end` by
  `taid_update` (the official update rule, see its docstring), once per step, after the loss
  is computed with the current `t`. `t`, the previous loss and the momentum live in the
  method state. The loss driving the update is the official one, the cross-entropy
  `-sum p_target log p_s` averaged over the global batch (`losses.taid`'s KL plus the
  target's entropy), so the schedule matches the official code; it is computed from the
  gathered global batch, so every device keeps the same `t`.

  Defaults from the official code (`src/arguments.py`, `scripts/*/taid.sh`): `t_start` 0.4,
  `t_end` 1.0, `alpha` 5e-4, `beta` 0.99, adaptive on, and `--distil_ratio 1` (no CE term).
  `num_train_steps` is the length of the run for the linear floor (the official code reads
  the trainer's `estimated_stepping_batches`): set it to `config.num_steps`.
  """
  name = "taid"
  family = "language model"
  paper = "Shing et al. 2025"
  field_help = {
      "taid_weight": "weight of the TAID term",
      "t_start": "interpolation coefficient t at step 0 (0: student, 1: teacher)",
      "t_end": "the value t moves towards",
      "alpha": "step size of t's adaptive update",
      "beta": "momentum of t's adaptive update",
      "adaptive": "True: TAID's adaptive schedule; False: linear from t_start to t_end",
  }

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=0.0, taid_weight=1.0, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99,
        adaptive=True, num_train_steps=1000))

  non_negative_fields = ("ce_weight", "taid_weight")

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "t_start", 0.0, 1.0, high_inclusive=False)
    base.check_interval(config, self.name, "t_end", 0.0, 1.0, low_inclusive=False)
    if config.t_end < config.t_start:
      raise ValueError(f"config.{self.name}.t_end={config.t_end!r} must be >= "
                       f"config.{self.name}.t_start={config.t_start!r}.")
    base.check_interval(config, self.name, "alpha", 0.0, 1.0)
    base.check_interval(config, self.name, "beta", 0.0, 1.0, high_inclusive=False)
    if not isinstance(config.adaptive, bool):
      raise ValueError(f"config.{self.name}.adaptive must be True or False, got "
                       f"{config.adaptive!r}.")
    base.check_positive_int(config, self.name, "num_train_steps")

  def init(self, rng, sample):
    del rng, sample
    return {}, {"t": jnp.asarray(self.config.t_start, jnp.float32),
                "prev_loss": jnp.asarray(jnp.inf, jnp.float32),
                "momentum": jnp.zeros((), jnp.float32)}

  def loss(self, params, state, batch, ops):
    c = self.config
    t = state["t"]
    ce = base.cross_entropy(batch, ops)
    per_example = losses.taid(batch.student.logits, batch.teacher.logits, t=t,
                              where=batch.where)
    taid = ops.mean(per_example, batch.where)
    loss = c.ce_weight * ce + c.taid_weight * taid
    signal = jax.lax.stop_gradient(per_example + _interpolated_target_entropy(
        batch.student.logits, batch.teacher.logits, t, batch.where))
    new_state = taid_update(
        state, ops.mean(signal, batch.where), batch.step, t_start=c.t_start,
        t_end=c.t_end, alpha=c.alpha, beta=c.beta, num_train_steps=c.num_train_steps,
        adaptive=c.adaptive)
    return loss, {"loss": loss, "ce": ce, "taid": taid, "taid_t": t,
                  "taid_momentum": new_state["momentum"],
                  "accuracy": base.accuracy(batch, ops)}, new_state

METHODS = (TAID,)
