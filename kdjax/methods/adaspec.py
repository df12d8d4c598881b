"""AdaSPEC: selective knowledge distillation for speculative decoders (Hu et al., 2025).

A draft model for speculative decoding is judged by how often the target accepts its tokens,
so it should spend its small capacity on the tokens it can learn. AdaSPEC first distils a
reference model (the draft's architecture, forward KL to the target on every token: the suite's
`fkl` row), then trains the draft on the tokens where it lags the reference most:

    delta_i = KL(p_target || q_draft)_i - KL(p_target || q_reference)_i       (per token)
    keep_i  = delta_i >= quantile_{1 - k}(delta over the batch's tokens)
    loss    = mean over kept tokens of KL(p_target || q_draft)

Tokens that even the reference cannot fit (small delta: hard for this capacity) are filtered
out. Defaults follow the official code (yuezhouhu/adaspec, `train.py`, `utils.py`): k = 0.4,
forward KL at temperature 1, the quantile with linear interpolation (`torch.quantile`). The
official code takes the quantile over each device's micro-batch; here it is taken over the
global batch, so that the numbers do not depend on the device count.

`config.adaspec.reference` names the reference: a suite row that runs before this one (its
checkpoint of the same seed), or a checkpoint directory / exported model file. The reference's
variables are kept (frozen) in the method state and run in `rewrite_batch`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.methods import base

REFERENCE_LOGITS_KEY = "adaspec_reference_logits"


def masked_quantile(values: jax.Array, where: jax.Array, q: float) -> jax.Array:
  """The q-quantile of `values[where]` with linear interpolation (as `torch.quantile`).

  values, where: same shape; at least one True in `where` (else the result is +inf)."""
  flat = jnp.where(where, values, jnp.inf).reshape(-1)
  ordered = jnp.sort(flat)  # Valid values first, ascending; padding (+inf) last.
  count = jnp.sum(where)
  position = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, jnp.maximum(count - 1, 0))
  low_value, high_value = ordered[low], ordered[high]
  return low_value + (position - low) * jnp.where(high > low, high_value - low_value, 0.0)


class AdaSPEC(base.Method):
  """Selective forward KL on the top `keep_fraction` tokens by `delta` (module docstring)."""
  name = "adaspec"
  family = "language model"
  paper = "Hu et al. 2025"
  field_help = {
      "keep_fraction": "fraction of the batch's tokens trained on (largest KL gap to the "
                       "reference)",
      "reference": "the reference model: a suite row that runs earlier, or a checkpoint path",
      "temperature": "softmax temperature of the forward KL",
  }
  # The rewrite only adds the reference's logits: the teacher sees the batch's own tokens, so
  # its logits may come from a cache (`kdjax.teachers.process_logits`): the default needs.
  # The config field naming the reference model (resolved by the suite and the run setup).
  reference_field = "reference"
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(keep_fraction=0.4, temperature=1.0,
                                          reference="fkl"))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "keep_fraction", 0.0, 1.0, low_inclusive=False)

  def init(self, rng, sample):
    del rng
    # Shape checks (`preflight`) trace `init` without a reference: the student's variables
    # have the reference's shapes (same architecture).
    reference = (self.facts.reference_variables
                 if self.facts.reference_variables is not None else sample.student_variables)
    return {}, {"reference": reference}

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del rng, ops, step
    reference, _ = models.student_apply(state["reference"], batch["tokens"], train=False,
                                        rng=None)
    return dict(batch, **{REFERENCE_LOGITS_KEY: jax.lax.stop_gradient(reference.logits)}), state

  def loss(self, params, state, batch, ops):
    c = self.config
    student, teacher = batch.student.logits, batch.teacher.logits
    # Absent only when the loss is traced alone (shape checks).
    reference = batch.data.get(REFERENCE_LOGITS_KEY, jax.lax.stop_gradient(student))
    kl_draft = losses.forward_kl(student, teacher, temperature=c.temperature, where=batch.where)
    kl_reference = losses.forward_kl(reference, teacher, temperature=c.temperature,
                                     where=batch.where)
    delta = jax.lax.stop_gradient(kl_draft - kl_reference)
    where = batch.where.astype(bool)
    threshold = masked_quantile(ops.gather(delta), ops.gather(where), 1.0 - c.keep_fraction)
    keep = where & (delta >= threshold)
    loss = ops.mean(kl_draft, keep)
    kept = ops.mean(keep.astype(jnp.float32), where)
    return loss, {"loss": loss, "fkl_all": ops.mean(kl_draft, where), "kept_fraction": kept,
                  "delta": ops.mean(delta, where),
                  "accuracy": base.accuracy(batch, ops)}, state


METHODS = (AdaSPEC,)
