"""Batch-relational logit methods: DIST.

A relational loss compares examples with each other, so it must see the whole global batch:
it is computed on `ops.gather(...)` of the student logits, the teacher logits and `where`,
which gives the same number on 1 device and on N (the step's `gather` is the identity under
`jit`, where arrays are already global, and an `all_gather` under `pmap`).
"""

import ml_collections

from kdjax import losses
from kdjax.methods import base


class DIST(base.Method):
  """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022):
  `ce_weight * CE + losses.dist(s, t, beta, gamma, temperature)` on the global batch.

  Defaults follow the official CIFAR-100 recipe (hunto/image_classification_sota,
  `configs/strategies/distill/dist_cifar.yaml`: `ori_loss_weight: 1`, `kd_loss_weight: 2`,
  `kd: dist_t4`, i.e. `DIST(beta=1, gamma=1, tau=4)` weighted by 2), written here as
  `beta = gamma = 2`, `temperature = 4`, CE weight 1. On ImageNet the paper uses
  `beta = gamma = 1`, `temperature = 1`.
  """
  name = "dist"
  family = "logit"
  paper = "Huang et al. 2022"
  field_help = {
      "beta": "weight of the inter-class (per-example) correlation term",
      "gamma": "weight of the intra-class (per-class, over the batch) correlation term",
      "temperature": "softmax temperature T; the loss is multiplied by T^2",
  }

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=1.0, beta=2.0, gamma=2.0, temperature=4.0))

  non_negative_fields = ("ce_weight", "beta", "gamma")
  positive_fields = ("temperature",)

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    dist = losses.dist(ops.gather(batch.student.logits), ops.gather(batch.teacher.logits),
                       beta=c.beta, gamma=c.gamma, temperature=c.temperature,
                       where=ops.gather(batch.where))
    loss = c.ce_weight * ce + dist
    return loss, {"loss": loss, "ce": ce, "dist": dist,
                  "accuracy": base.accuracy(batch, ops)}, state

METHODS = (DIST,)
