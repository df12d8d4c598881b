"""Logit distillation methods: scratch (no teacher), KD, DKD, KD with logit standardization
and NKD."""

import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.methods import base, lm_fused


class Scratch(base.Method):
  """Cross-entropy on the labels only; trains a teacher or a no-distillation baseline."""
  name = "scratch"
  family = "baseline"
  teacher_needs = base.TeacherNeeds(kind="none")

  def loss(self, params, state, batch, ops):
    ce = base.cross_entropy(batch, ops)
    return ce, {"loss": ce, "ce": ce, "accuracy": base.accuracy(batch, ops)}, state


class KD(base.Method):
  """`ce_weight * CE + kd_weight * losses.kd` (Hinton et al. 2015).

  Defaults follow mdistiller's CIFAR-100 recipe: CE 0.1, KD 0.9, T = 4. `fused` ('auto')
  computes the KD term of a language model from hidden states (`kdjax.methods.lm_fused`).
  """
  name = "kd"
  family = "logit"
  paper = "Hinton et al. 2015"
  teacher_needs = base.TeacherNeeds(cache="topk")
  field_help = {"fused": lm_fused.FIELD_HELP}

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=0.1, kd_weight=0.9, temperature=4.0,
                                          fused="auto"))

  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)
  # The KD term compares the models' own logits, so it may be computed from hidden states;
  # subclasses that transform the logits (`kd_logits`) set False.
  fusable = True

  def __init__(self, config):
    super().__init__(config)
    if self.fusable:
      lm_fused.check_mode(config, self.name)

  def kd_logits(self, batch):
    """The (student, teacher) logits the KD term compares; subclasses transform them."""
    return batch.student.logits, batch.teacher.logits

  def loss(self, params, state, batch, ops):
    c = self.config
    fused = self.fusable and lm_fused.use_fused(lm_fused.mode(c), batch, self.name)
    ce, ce_metrics = lm_fused.ce_and_accuracy(batch, ops, fused=fused, ce_weight=c.ce_weight)
    if fused:
      per_token = lm_fused.divergence(losses.kd, batch, fused=True, temperature=c.temperature)
    else:
      student, teacher = self.kd_logits(batch)
      per_token = losses.kd(student, teacher, temperature=c.temperature, where=batch.where)
    kd = ops.mean(per_token, batch.where)
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "kd": kd, **ce_metrics}, state


class DKD(base.Method):
  """Decoupled KD (Zhao et al. 2022): `ce_weight * CE + warmup * losses.dkd`.

  As in mdistiller, the DKD term is scaled by `min(step / warmup_steps, 1)` because the large
  NCKD weight (beta = 8) destabilises early training. Steps depend on the dataset, so the
  default is 0 (no warm-up) and recipes set it: 20 epochs in
  configs/cifar100_resnet32x4_resnet8x4.py.
  """
  name = "dkd"
  family = "logit"
  paper = "Zhao et al. 2022"
  field_help = {
      "alpha": "weight of TCKD, the target vs non-target binary KL",
      "beta": "weight of NCKD, the KL over the non-target classes",
      "warmup_steps": "steps over which the DKD term ramps from 0 to 1 (0: none)",
  }

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(
        dict(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_steps=0))

  non_negative_fields = ("ce_weight", "alpha", "beta", "warmup_steps")
  positive_fields = ("temperature",)

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    dkd = ops.mean(losses.dkd(batch.student.logits, batch.teacher.logits, batch.labels,
                              alpha=c.alpha, beta=c.beta, temperature=c.temperature,
                              where=batch.where), batch.where)
    warmup = (jnp.minimum(batch.step.astype(jnp.float32) / c.warmup_steps, 1.0)
              if c.warmup_steps else 1.0)
    loss = c.ce_weight * ce + warmup * dkd
    return loss, {"loss": loss, "ce": ce, "dkd": dkd, "dkd_warmup": jnp.asarray(warmup),
                  "accuracy": base.accuracy(batch, ops)}, state


class KDStd(KD):
  """KD on standardized logits (Sun et al., "Logit Standardization in Knowledge Distillation",
  CVPR 2024): `ce_weight * CE + kd_weight * kd(standardize_logits(s), standardize_logits(t), T)`.

  Defaults are the official KD+LS recipe (sunshangquan/logit-standardization-KD, mdistiller
  based): `tools/train.py --logit-stand` sets `KD.LOSS.KD_WEIGHT = --kd-weight` (default 9)
  and `KD.TEMPERATURE = --base-temp` (default 2), keeping mdistiller's `KD.LOSS.CE_WEIGHT`
  0.1; the CIFAR-100 configs are tagged `kd,<teacher>,<student>,2,9`. The large KD weight
  compensates for standardized logits having unit variance, so `p = softmax(z / 2)` is soft.
  """
  name = "kd_std"
  family = "logit"
  paper = "Sun et al. 2024"
  fusable = False
  field_help = {
      "temperature": "softmax temperature of the KD term on the standardised logits",
  }

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=0.1, kd_weight=9.0, temperature=2.0))

  def kd_logits(self, batch):
    # Padding rows are zeroed before standardizing: a NaN row would poison the gradient.
    student = losses.standardize_logits(base.mask_rows(batch.student.logits, batch.where))
    teacher = losses.standardize_logits(base.mask_rows(batch.teacher.logits, batch.where))
    return student, teacher


class NKD(base.Method):
  """Normalized KD (Yang et al., ICCV 2023): `ce_weight * CE + nkd_weight * losses.nkd`.

  Defaults from the official code (yzd-v/cls_KD): `NKDLoss(temp=1.0, gamma=1.5)`, the loss
  class defaults and the ImageNet configs (`configs/distillers/imagenet/*_distill_*.py`),
  added with weight 1 to the student's CE (weight 1). The repository's CIFAR-100 config
  (`res34_distill_res18_cifar.py`) uses `temp=3.0, gamma=3.5` instead.
  """
  name = "nkd"
  family = "logit"
  paper = "Yang et al. 2023"
  field_help = {
      "nkd_weight": "weight of the NKD term",
      "gamma": "weight of NKD's non-target term",
      "temperature": "softmax temperature of the non-target term",
  }

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(
        dict(ce_weight=1.0, nkd_weight=1.0, temperature=1.0, gamma=1.5))

  non_negative_fields = ("ce_weight", "nkd_weight", "gamma")
  positive_fields = ("temperature",)

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    nkd = ops.mean(losses.nkd(batch.student.logits, batch.teacher.logits, batch.labels,
                              temperature=c.temperature, gamma=c.gamma, where=batch.where),
                   batch.where)
    loss = c.ce_weight * ce + c.nkd_weight * nkd
    return loss, {"loss": loss, "ce": ce, "nkd": nkd, "accuracy": base.accuracy(batch, ops)}, state

METHODS = (Scratch, KD, DKD, KDStd, NKD)
