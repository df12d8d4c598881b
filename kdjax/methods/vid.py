"""VID: variational information distillation (Ahn et al. 2019).

`ce_weight * CE + kd_weight * KD(T) + feature_weight * sum over tap pairs of losses.vid`.
For each pair a method-owned regressor (three 1x1 convolutions without bias, ReLU between,
`C_s -> C_t -> C_t -> C_t`) predicts the mean of the teacher's feature from the student's, and
a per-channel parameter `alpha` sets the variance `softplus(alpha) + eps`; both are trained
with the student and checkpointed. A map larger than its partner is average-pooled to the
partner's size first. This is RepDistiller's `VIDLoss(s_C, t_C, t_C)` on `feat[1:-1]`
(HobbitLong/RepDistiller `distiller_zoo/VID.py` @ `1e2f816`, `train_student.py` @ `1143dfe`),
`init_pred_var` 5, `eps` 1e-5; weight 1 (`scripts/run_cifar_distill.sh` @ `b0722bc`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import validation
from kdjax.losses.variational import vid as vid_loss
from kdjax.methods import base, feature
from kdjax.methods.feature import pool_to_common_size


class Regressor(nn.Module):
  """VID's mean predictor: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, all without bias. A
  dense layer on the last (channel) axis is a 1x1 conv on NHWC maps and a linear map on
  `[B, D]` embeddings."""
  hidden: int
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, use_bias=False, name="conv1")(x))
    x = nn.relu(nn.Dense(self.hidden, use_bias=False, name="conv2")(x))
    return nn.Dense(self.features, use_bias=False, name="conv3")(x)


class VID(feature.FeatureMethod):
  """Variational information distillation. RepDistiller's CIFAR-100 run: `-r 1 -a 0 -b 1`,
  every stage (`stage1..3`), `init_variance` 5, `eps` 1e-5."""
  name = "vid"
  family = "feature"
  paper = "Ahn et al. 2019"
  field_help = {
      "init_variance": "initial per-channel variance of the Gaussian",
      "eps": "floor added to the variance",
  }
  default_student_tap = "stage1,stage2,stage3"
  default_teacher_tap = "stage1,stage2,stage3"
  default_feature_weight = 1.0
  positive_fields = ("temperature", "eps")

  @classmethod
  def extra_config(cls):
    return dict(init_variance=5.0, eps=1e-5)

  def __init__(self, config):
    super().__init__(config)
    # The variance is softplus(alpha) + eps: it starts at init_variance only above eps.
    validation.require(config.init_variance, validation.Rule(
        lambda v: v > config.eps, f"a number larger than config.vid.eps={config.eps!r}"),
                       "config.vid.init_variance")

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    same_rank = len(student_shape) == len(teacher_shape) and len(student_shape) in (2, 4)
    if not same_rank:
      raise ValueError(
          f"config.vid.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
          f"config.vid.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: the "
          "regressor maps channels (the last axis) of two maps [B, H, W, C] (the larger is "
          "pooled to the smaller's size) or of two embeddings [B, D].")

  def _regressor(self, teacher):
    return Regressor(hidden=teacher.shape[-1], features=teacher.shape[-1])

  def init(self, rng, sample):
    super().init(rng, sample)
    c = self.config
    # alpha such that softplus(alpha) + eps = init_variance (RepDistiller's log_scale init).
    alpha = math.log(math.expm1(c.init_variance - c.eps))
    params = {}
    for i, (_, _, student, teacher) in enumerate(self._pairs(sample)):
      student, teacher = pool_to_common_size(student, teacher)
      params[f"regressor{i}"] = self._regressor(teacher).init(
          jax.random.fold_in(rng, i), student)["params"]
      params[f"alpha{i}"] = jnp.full((teacher.shape[-1],), alpha, jnp.float32)
    return params, {}

  def term(self, params, pairs, batch, ops):
    total = 0.0
    for i, (_, _, student, teacher) in enumerate(pairs):
      student, teacher = pool_to_common_size(student, teacher)
      # Padding rows may hold NaN: zeroed before the regressor (the loss ignores them anyway).
      mean = self._regressor(teacher).apply({"params": params[f"regressor{i}"]},
                                            base.mask_rows(student, batch.where))
      per_example = vid_loss(mean, teacher, params[f"alpha{i}"], eps=self.config.eps,
                                   where=batch.where)
      total = total + ops.mean(per_example, batch.where)
    return total


METHODS = (VID,)
