"""A teacher that is an exponential moving average of the student (mean teacher).

The teacher is the student's own apply function on variables kept in method state: a copy of
the student's initial variables (params and BatchNorm statistics, `Batch.student_variables`
at init) that after every optimizer step moves towards the student's new variables,
`teacher <- m_t * teacher + (1 - m_t) * student` (`losses.ema_update`), inside the jitted
step (`update_after_step`). The step runs it in eval mode under `stop_gradient` like any
teacher (`self_teacher`), so no teacher checkpoint is loaded. The state is replicated like the
params (the whole train state is), and since the step reduces the gradients before the update,
every replica moves its copy identically.

Momentum `m_t` (`losses.ema_momentum`): 'cosine' from `momentum` at step 0 to `momentum_end`
at `num_steps`, as BYOL (Grill et al. 2020, base 0.996 -> 1) and DINO (Caron et al. 2021,
`main_dino.py` `--momentum_teacher 0.996` and `utils.cosine_scheduler(momentum_teacher, 1,
...)`); or 'constant' (the mean teacher of Tarvainen & Valpola 2017, e.g. 0.99 / 0.999).
"""

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses, validation
from kdjax.losses import self_distillation as sd_losses
from kdjax.methods import base


class EMATeacher(base.Method):
  """`ce_weight * CE + kd_weight * kd(student, EMA teacher, T)`.

  Defaults: momentum 0.996 -> 1 on a cosine (BYOL / DINO); the loss weights are kdjax's choice
  for a supervised mean teacher, KD as Hinton et al. (T 4) beside the full CE (CE 1, KD 1):
  the EMA teacher starts as the student, so the labels must drive learning from the start.
  Set `num_steps` to the run's `config.num_steps`.
  """
  name = "ema_teacher"
  family = "self"
  paper = "Tarvainen & Valpola 2017"
  field_help = {
      "momentum": "EMA momentum at step 0",
      "momentum_end": "EMA momentum at num_steps (schedule 'cosine')",
      "schedule": "'cosine' (momentum -> momentum_end) or 'constant'",
  }
  teacher_needs = base.TeacherNeeds(kind="self")
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=1.0, temperature=4.0, momentum=0.996, momentum_end=1.0,
        schedule="cosine", num_steps=1000))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "momentum", 0.0, 1.0)
    base.check_interval(config, self.name, "momentum_end", 0.0, 1.0)
    validation.one_of(f"config.{self.name}.schedule", config.schedule,
                      sd_losses.EMA_SCHEDULES)
    base.check_positive_int(config, self.name, "num_steps")

  def init(self, rng, sample):
    del rng
    if sample.student_variables is None:
      raise ValueError("ema_teacher starts from the student's initial variables; pass them "
                       "as Batch.student_variables to init (the run does).")
    # A copy, not the same buffers: the train state is donated to the step, and a buffer held
    # twice (student params and teacher) cannot be donated twice.
    teacher = jax.tree.map(lambda x: jnp.array(x, copy=True), sample.student_variables)
    return {}, {"teacher": teacher}

  def teacher_variables_from_state(self, state):
    return state["teacher"]

  def momentum(self, step):
    c = self.config
    return sd_losses.ema_momentum(step, momentum=c.momentum, momentum_end=c.momentum_end,
                                  num_steps=c.num_steps, schedule=c.schedule)

  def update_after_step(self, state, student_variables, step, *, method_params):
    del method_params
    teacher = state["teacher"]
    # Only what the teacher holds moves (a model state entry the student gains later, such
    # as a cache, is not part of the teacher).
    student = {key: student_variables[key] for key in teacher}
    return dict(state, teacher=sd_losses.ema_update(teacher, student, self.momentum(step)))

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                            temperature=c.temperature, where=batch.where), batch.where)
    loss = c.ce_weight * ce + c.kd_weight * kd
    metrics = {"loss": loss, "ce": ce, "kd": kd, "momentum": self.momentum(batch.step),
               "accuracy": base.accuracy(batch, ops)}
    return loss, metrics, state


METHODS = (EMATeacher,)
