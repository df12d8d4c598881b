"""Distillation from several teachers at once."""

import ml_collections

from kdjax import losses
from kdjax.methods import base


def _numbers(value):
  """A number or a sequence of numbers as a tuple, or None if it is neither."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (value,)
  if isinstance(value, (tuple, list)) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return tuple(value)
  return None


class MultiTeacherKD(base.Method):
  """`ce_weight * CE + kd_weight * losses.multi_teacher_kd(s, teachers, weights, temperatures)`
  (You et al., "Learning from Multiple Teacher Networks", KDD 2017): a weighted sum of
  Hinton KD losses, one per teacher.

  `Batch.teacher.logits` is `[N_teachers, b, C]` (`teacher_needs.kind == "ensemble"`). `weights`:
  one per teacher, or empty for uniform `1 / N`. `temperatures`: one for all teachers (a
  number or a 1-tuple) or one per teacher. Defaults mirror `kd` (mdistiller: CE 0.1, KD 0.9,
  T 4), uniform weights. Their lengths are checked against N when the loss first runs.
  """
  name = "multi_teacher_kd"
  family = "logit"
  paper = "You et al. 2017"
  field_help = {
      "weights": "one weight per teacher, or () for uniform 1/N",
      "temperatures": "one temperature for all teachers, or one per teacher",
  }
  teacher_needs = base.TeacherNeeds(kind="ensemble")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(
        dict(ce_weight=0.1, kd_weight=0.9, weights=(), temperatures=(4.0,)))

  non_negative_fields = ("ce_weight", "kd_weight")

  def __init__(self, config):
    super().__init__(config)
    weights = _numbers(config.weights)
    if weights is None or any(w < 0 for w in weights):
      raise ValueError(f"config.{self.name}.weights must be a tuple of numbers >= 0 (one per "
                       f"teacher) or () for uniform weights, got {config.weights!r}.")
    if weights and sum(weights) <= 0:
      raise ValueError(f"config.{self.name}.weights must not all be 0, got {config.weights!r}.")
    temperatures = _numbers(config.temperatures)
    if not temperatures or any(t <= 0 for t in temperatures):
      raise ValueError(f"config.{self.name}.temperatures must be a positive number or a "
                       "non-empty tuple of positive numbers (one for all teachers or one per "
                       f"teacher), got {config.temperatures!r}.")
    self.weights = weights or None
    self.temperatures = temperatures[0] if len(temperatures) == 1 else temperatures

  def loss(self, params, state, batch, ops):
    c = self.config
    teacher_logits = batch.teacher.logits
    num_teachers = teacher_logits.shape[0]
    if teacher_logits.ndim != batch.student.logits.ndim + 1:
      raise ValueError(
          f"Method {self.name!r} needs the teachers' logits stacked as [N_teachers, "
          f"*student logits shape], got teacher logits {tuple(teacher_logits.shape)} for "
          f"student logits {tuple(batch.student.logits.shape)}.")
    for field, value in (("weights", self.weights), ("temperatures", self.temperatures)):
      if isinstance(value, tuple) and len(value) != num_teachers:
        raise ValueError(f"config.{self.name}.{field}={getattr(c, field)!r} has {len(value)} "
                         f"entries but there are {num_teachers} teachers.")
    ce = base.cross_entropy(batch, ops)
    kd = ops.mean(losses.multi_teacher_kd(batch.student.logits, teacher_logits,
                                          weights=self.weights,
                                          temperatures=self.temperatures,
                                          where=batch.where), batch.where)
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd, "accuracy": base.accuracy(batch, ops)}, state

METHODS = (MultiTeacherKD,)
