"""TF-KD: teacher-free knowledge distillation (Yuan et al., CVPR 2020).

"Revisiting Knowledge Distillation via Label Smoothing Regularization" reads KD as a learned
label smoothing and offers two teacher-free variants and a reversed one; two kdjax methods,
because whether a run loads a teacher is a property of the method name
(`get_method_class(name).teacher_needs.kind == "none"`):

- `tf_kd` (Tf-KD_reg, the manually designed virtual teacher; no teacher checkpoint): the
  virtual teacher puts `correct_prob` on the label and spreads the rest uniformly, softened
  by a softmax at temperature `T` (`losses.virtual_teacher_probs`), and the loss is
  `ce_weight * CE + kd_weight * KL(p^d || p_s) / C` (`losses.tf_kd_virtual`).
- `tf_kd_reversed` (Re-KD, and Tf-KD_self): ordinary KD whose teacher is *weaker* than the
  student: the paper trains a strong model (ResNet18) with a small or poorly trained one
  (MobileNetV2, ShuffleNetV2, a teacher from an early epoch) as its teacher, and Tf-KD_self
  uses a pretrained copy of the student itself. In a kdjax run the student is the strong
  model and `config.teacher` names the weak one (or a checkpoint of the student's own
  architecture); the loss is the official `loss_kd` / `loss_kd_self`:
  `ce_weight * CE + kd_weight * T**2 * KL(p_t^T || p_s^T) / C`, with
  `kd_weight = alpha * multiplier` for Tf-KD_self.

The `/ C`: the official code's `nn.KLDivLoss()` uses PyTorch's default `reduction='mean'`,
which averages over the batch *and* the classes; the published weights (`multiplier` 100 for
the virtual teacher) are tuned with it, so it is kept.
"""

import ml_collections

from kdjax import losses
from kdjax.losses import self_distillation as sd_losses
from kdjax.methods import base


class TFKDVirtual(base.Method):
  """Tf-KD_reg: `ce_weight * CE + kd_weight * KL(virtual teacher || student) / C`.

  Defaults: the official code (yuanli2333/Teacher-free-Knowledge-Distillation@880a74e):
  `loss_kd_regularization` is `(1 - reg_alpha) * CE + reg_alpha * multiplier * KLDiv`, with
  `experiments/base_experiments/base_resnet18/params.json` `reg_alpha` 0.1, `multiplier` 100,
  `reg_temperature` 20, and `correct_prob` 0.99 in `my_loss_function.py`: CE 0.9, KD 10.
  The student is at temperature 1 and there is no `T**2`, as there.
  """
  name = "tf_kd"
  family = "self"
  paper = "Yuan et al. 2020"
  field_help = {
      "correct_prob": "the virtual teacher's probability of the true class",
      "temperature": "temperature of the virtual teacher",
  }
  teacher_needs = base.TeacherNeeds(kind="none")
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=0.9, kd_weight=10.0, temperature=20.0,
                                          correct_prob=0.99))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "correct_prob", 0.0, 1.0, low_inclusive=False,
                        high_inclusive=False)

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    logits = batch.student.logits
    labels = base.mask_rows(batch.labels, batch.where)
    virtual = sd_losses.tf_kd_virtual(logits, labels, correct_prob=c.correct_prob,
                                      temperature=c.temperature, where=batch.where)
    kd = ops.mean(virtual, batch.where) / logits.shape[-1]
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd, "accuracy": base.accuracy(batch, ops)}, state


class TFKDReversed(base.Method):
  """Re-KD / Tf-KD_self: `ce_weight * CE + kd_weight * T**2 * KL(p_t || p_s) / C`.

  Defaults: the official Re-KD run `experiments/kd_experiments/resnet18_distill/
  mobilenet_v2_teacher/params.json` (ResNet18 taught by MobileNetV2: `alpha` 0.6,
  `temperature` 20) through `loss_kd`: `(1 - alpha) * CE + alpha * T**2 * KLDiv`.
  """
  name = "tf_kd_reversed"
  family = "self"
  paper = "Yuan et al. 2020"
  teacher_needs = base.TeacherNeeds(cache="topk")
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=0.4, kd_weight=0.6, temperature=20.0))

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    logits = batch.student.logits
    kd = ops.mean(losses.kd(logits, batch.teacher.logits, temperature=c.temperature,
                            where=batch.where), batch.where) / logits.shape[-1]
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd, "accuracy": base.accuracy(batch, ops)}, state


METHODS = (TFKDVirtual, TFKDReversed)
