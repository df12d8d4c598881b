"""Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): distilling a teacher
whose vocabulary, and tokenizer, differ from the student's.

    loss = ce_weight * CE(student, labels) + uld_weight * mean over aligned tokens of
           sum_i |sort(p_s)_i - sort(p_t)_i|          (`kdjax.losses.uld`)

Sorted probabilities need no mapping between the two vocabularies (the shorter sorted vector
is zero-padded), so the teacher's logits may be `[b, T_t, V_t]` with `V_t != V_s`.

Which positions are compared (`kdjax.losses.align_completions`, the official code's rule,
Nicolas-BZRD/llm-recipes `models/distillation_model.py`): in each row the k-th completion token
of the student is paired with the k-th completion token of the teacher, counted from the start
of the completion, and the longer completion is truncated to the shorter. Two batch layouts:

* one tokenizer, two vocabulary sizes (Qwen2.5-7B's 152064 rows against Qwen2.5-0.5B's
  151936, or any teacher whose embedding is padded differently): both models read the batch's
  'tokens'; the completion masks are the same, so every token is paired with itself;
* two tokenizers: the batch also carries the teacher's own tokenization of the same rows,
  'teacher_tokens' [b, T_t] and its completion mask 'teacher_mask' [b, T_t]
  (`kdjax.data.chat_data.ChatInputPipeline` with `teacher_tokenizer`); `rewrite_batch` runs the teacher on them and
  hands its logits to the step as the batch's teacher outputs, so the step does not run the
  teacher on the student's token ids.

Defaults (the official recipe, llm-recipes' README): `ce_weight` 1, `uld_weight` ("distil
factor") 1.5, both temperatures 1. kdjax averages the distance over the batch's aligned tokens,
as its other LM methods do; the official code averages per sequence, then over sequences.
There is no fused mode: sorting needs each position's whole probability vector.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.data.chat_data import TEACHER_MASK_KEY, TEACHER_TOKENS_KEY
from kdjax.methods import base
from kdjax.teachers import keys as teacher_keys
# Methods whose teacher may have another vocabulary than `config.num_classes` (read by
# `kdjax.train.validate.validate_pretrained`).
CROSS_VOCABULARY_METHODS = ("uld",)


class ULD(base.Method):
  """`ce_weight * CE + uld_weight * ULD` on aligned completion tokens (module docstring)."""
  name = "uld"
  family = "language model"
  paper = "Boizard et al. 2024"
  field_help = {
      "ce_weight": "weight of the student's cross-entropy on its own labels",
      "uld_weight": "weight lambda of the sorted-probability distance (the 'distil factor')",
      "student_temperature": "softmax temperature of the student's probabilities",
      "teacher_temperature": "softmax temperature of the teacher's probabilities",
  }
  non_negative_fields = ("ce_weight", "uld_weight")
  positive_fields = ("student_temperature", "teacher_temperature")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(ce_weight=1.0, uld_weight=1.5,
                                          student_temperature=1.0, teacher_temperature=1.0))

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    """With the teacher's own tokenization in the batch, the teacher's logits on it become
    the batch's teacher outputs (the step then does not run the teacher itself)."""
    del rng, ops, step
    if TEACHER_TOKENS_KEY not in batch or teacher_keys.holds_outputs(batch):
      return batch, state
    if models.teacher_apply is None:
      raise ValueError("uld: the batch carries 'teacher_tokens' but the run has no teacher "
                       "to run on them.")
    output, _ = models.teacher_apply(models.teacher_variables, batch[TEACHER_TOKENS_KEY],
                                     train=False, rng=None)
    return dict(batch, **{teacher_keys.LOGITS_KEY: jax.lax.stop_gradient(output.logits)}), state

  def loss(self, params, state, batch: base.Batch, ops: base.BatchOps):
    c = self.config
    teacher_where = batch.data.get(TEACHER_MASK_KEY, batch.where)
    if TEACHER_TOKENS_KEY in batch.data and TEACHER_MASK_KEY not in batch.data:
      raise ValueError("uld: the batch carries 'teacher_tokens' without 'teacher_mask' (the "
                       "teacher's completion tokens).")
    per_token = losses.uld(batch.student.logits, batch.teacher.logits,
                           student_where=batch.where, teacher_where=teacher_where,
                           student_temperature=c.student_temperature,
                           teacher_temperature=c.teacher_temperature)
    _, aligned = losses.align_completions(batch.where, teacher_where)
    distance = ops.mean(per_token, aligned)
    ce = base.cross_entropy(batch, ops)
    loss = c.ce_weight * ce + c.uld_weight * distance
    metrics: Dict[str, jax.Array] = {
        "loss": loss, "ce": ce, "uld": distance, "accuracy": base.accuracy(batch, ops),
        # Below 1 when the two tokenizations give completions of different lengths.
        "uld_aligned_fraction": ops.mean(aligned.astype(jnp.float32), batch.where)}
    return loss, metrics, state


METHODS = (ULD,)
