"""CS-KD: class-wise self-knowledge distillation (Yun et al. 2020).

Each training example `x` (an anchor) comes with a partner `x'`, a different training example
of the same class; the student's softened predictions on `x'`, without gradient, are the
target of its predictions on `x`:

  loss = ce_weight * CE(z(x), y) + kd_weight * T^2 * KL(p(x') || p(x)),  p = softmax(z / T)

with CE and KL averaged over the anchors. There is no second model: the teacher is the student
itself on another sample of the class, which regularises the class-wise predictions to agree
(the paper's "dark knowledge" of the class) and reduces over-confidence.

Where this comes from (alinlab/cs-kd train.py@b706db95): `KDLoss.forward(input=outputs,
target=outputs_cls.detach())` is `sum q (log q - log_softmax(input / T)) * T^2 / n` with
`q = softmax(target / T)`, i.e. `T^2 KL(p(x') || p(x))` averaged over the anchors, the gradient
only through the anchor's logits (the partner's pass runs under `torch.no_grad`); the CE is on
the anchors only (`criterion(outputs, targets[:batch_size//2])`); `--lamda 1.0` and
`--temp 4.0` are the defaults here (`kd_weight`, `temperature`).

Batches come from `InputPipeline(..., sampler='class_pairs')` (`kdjax.data.pairing`): the
second half of a global batch of `B` rows holds the partners of the first half, and
`Batch.data['partner_row']` gives each anchor row its partner's global row (-1 on partner
rows). So the student runs once on all `B` rows and the method splits its outputs: `B / 2`
anchors per step, as the official code's `--batch-size 128` is 256 rows. One difference:
the official code runs the partners in a separate forward pass, so BatchNorm normalises the
anchors and the partners with separate batch statistics; here they share one pass.

The partners' logits are read from the gathered global batch (`ops.gather`), under
`stop_gradient`, so a partner on another device (pmap) or another host is found by its row.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses, validation
from kdjax.methods import base

# `kdjax.data.pairing.PARTNER_ROW_KEY`, spelled out: importing kdjax.data would load grain
# into every process that only needs the methods (a test checks the two agree).
PARTNER_ROW_KEY = "partner_row"


class CSKD(base.Method):
  """`ce_weight * CE + kd_weight * T^2 KL(p(partner) || p(anchor))` on class-paired batches.

  Defaults: alinlab/cs-kd train.py@b706db95 (`--lamda 1.0`, `--temp 4.0`, CE weight 1).
  """
  name = "cs_kd"
  family = "self"
  paper = "Yun et al. 2020"
  field_help = {
      "kd_weight": "weight of the KL between the partner's and the anchor's predictions",
  }
  teacher_needs = base.TeacherNeeds(kind="none")
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)
  # The pipeline sampler whose batches this method reads (`InputPipeline(sampler=...)`).
  sampler = "class_pairs"

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=1.0, kd_weight=1.0, temperature=4.0))

  def anchors_and_partners(self, batch: base.Batch, ops: base.BatchOps):
    """Returns (anchor [b] bool, partner logits [b, C] without gradient).

    `anchor` is True on the rows that get the loss: anchor rows (`partner_row >= 0`) selected
    by `where` whose partner row is selected too. Other rows' partner logits are 0.
    """
    if PARTNER_ROW_KEY not in batch.data:
      raise validation.ConfigError(
          f"Method {self.name!r} needs class-paired batches with {PARTNER_ROW_KEY!r}; the batch "
          f"has {sorted(batch.data)}. Train with the 'class_pairs' sampler "
          "(InputPipeline(sampler='class_pairs')).")
    logits = batch.student.logits
    if logits.ndim != 2:
      raise ValueError(f"Method {self.name!r} needs [b, C] class logits; the student's have "
                       f"shape {logits.shape}.")
    partner_row = batch.data[PARTNER_ROW_KEY]
    # Rows of the global batch: the partner may sit on another device or host.
    all_logits = ops.gather(jax.lax.stop_gradient(logits))
    all_where = ops.gather(batch.where.astype(bool))
    row = jnp.clip(partner_row, 0, all_logits.shape[0] - 1)
    anchor = batch.where.astype(bool) & (partner_row >= 0) & all_where[row]
    return anchor, base.mask_rows(all_logits[row], anchor)

  def loss(self, params, state, batch, ops):
    c = self.config
    anchor, partner_logits = self.anchors_and_partners(batch, ops)
    anchors = dataclasses.replace(batch, where=anchor)
    ce = base.cross_entropy(anchors, ops)
    kd = ops.mean(losses.kd(base.mask_rows(batch.student.logits, anchor), partner_logits,
                            temperature=c.temperature, where=anchor), anchor)
    loss = c.ce_weight * ce + c.kd_weight * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd,
                  "accuracy": base.accuracy(anchors, ops)}, state


METHODS = (CSKD,)
