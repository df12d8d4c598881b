"""Token-level divergences from hidden states (`kdjax.losses.fused_*`) inside LM methods.

A token-level LM method (kd, fkl, rkl, jsd, skew_fkl, skew_rkl, tvd, gkd, distillm) has a
`fused` field: 'off' computes its divergence from the `[b, T, V]` logits of both Outputs;
'on' from `features['hidden']` [b, T, D] and `features['unembedding']` [D, V] of both, with
the vocabulary-chunked losses, so that no `[b, T, V]` array is held (the models' own logits
are then unused, and XLA drops them from the jitted step); 'auto' (the default) is 'on' when
both Outputs carry those two features and one sequence's logits hold at least
`AUTO_MIN_TOKENS_X_VOCAB` entries, else 'off'. Values and gradients are the same
(`tests/methods/test_lm_fused.py`).

Why 2**24 (e.g. Llama 3's V = 128256 at T >= 131, Qwen's 151936 at T >= 111, a 32000
vocabulary at T >= 525): unfused, each sequence holds at least three float32 `[T, V]`
arrays in the step (student logits, their gradient, teacher logits), 12 * T * V bytes =
200 MB at 2**24 entries per sequence, more than the activations of a ~150M-parameter student
at T = 2048 (~12 * L * T * D * 2 bytes ~ 0.6 GB for a batch of 4 at L = 12, D = 768, i.e.
~150 MB a sequence). Below it the logits are not what fills the memory, and the
chunked loss's extra passes over the unembedding (about 2x the logits' FLOPs,
`kdjax/losses/fused.py`) cost more than they save; kdjax's byte-level models (V = 259) stay
unfused at any length they read.

Models carrying the `unembedding` feature: the pretrained families
(`kdjax.models.pretrained`), except Gemma 2 with `final_logit_softcapping`, whose logits are
`c tanh(hidden @ W / c)`, which the fused losses do not compute ('on' is refused for it in
one line, 'auto' stays unfused).

Cross-entropy on the labels in the fused mode is computed block by block over tokens
(`chunked_cross_entropy`), and only when the method's `ce_weight` is > 0 (it costs one more
`[N, D] x [D, V]` product); the `ce` and `accuracy` metrics are then reported only with it.
"""

from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from kdjax import losses, validation
from kdjax.methods import base
from kdjax.models.output import Output

FUSED_MODES = ("auto", "on", "off")
FIELD_HELP = ("'auto', 'on' or 'off': the divergence from hidden states, vocabulary-chunked "
              "(kdjax.methods.lm_fused; auto: V x T >= 2**24)")
AUTO_MIN_TOKENS_X_VOCAB = 1 << 24
HIDDEN, UNEMBEDDING = "hidden", "unembedding"
# Entries of one float32 block of logits in `chunked_cross_entropy` (128 MiB).
CE_BLOCK_ENTRIES = 1 << 25

FUSED: Dict[Callable, Callable] = {
    losses.kd: losses.fused_kd,
    losses.forward_kl: losses.fused_forward_kl,
    losses.reverse_kl: losses.fused_reverse_kl,
    losses.generalized_jsd: losses.fused_generalized_jsd,
    losses.skew_forward_kl: losses.fused_skew_forward_kl,
    losses.skew_reverse_kl: losses.fused_skew_reverse_kl,
    losses.total_variation: losses.fused_total_variation,
}


def mode(config) -> str:
  """`config.fused`; 'auto' for the config of a subclass that does not declare it."""
  return config.get("fused", "auto")


def check_mode(config, method: str) -> None:
  """`config.<method>.fused` is one of FUSED_MODES."""
  validation.one_of(f"config.{method}.fused", mode(config), FUSED_MODES)


def carries_unembedding(output: Optional[Output]) -> bool:
  return output is not None and HIDDEN in output.features and UNEMBEDDING in output.features


def use_fused(mode: str, batch: base.Batch, method: str) -> bool:
  """Whether this step's divergence is fused (decided while tracing, from static shapes)."""
  if mode == "off":
    return False
  both = carries_unembedding(batch.student) and carries_unembedding(batch.teacher)
  if mode == "on" and not both:
    raise ValueError(
        f"config.{method}.fused='on' needs features 'hidden' and 'unembedding' from the "
        "student and the teacher (the pretrained families carry them, except Gemma 2 with "
        "final_logit_softcapping; cached teacher logits have none); set it to 'auto' or 'off'.")
  logits_shape = batch.student.logits.shape
  return both and (mode == "on" or logits_shape[-1] * logits_shape[-2]
                   >= AUTO_MIN_TOKENS_X_VOCAB)


def divergence(loss_fn: Callable, batch: base.Batch, *, fused: bool, student: Output = None,
               teacher: Output = None, **kwargs) -> jax.Array:
  """[b, T] per-token `loss_fn(student logits, teacher logits, where=batch.where, **kwargs)`,
  or its fused form from hidden states (same value; `student`/`teacher` default to the
  batch's Outputs)."""
  student = batch.student if student is None else student
  teacher = batch.teacher if teacher is None else teacher
  if not fused:
    return loss_fn(student.logits, teacher.logits, where=batch.where, **kwargs)
  return FUSED[loss_fn](student.features[HIDDEN], student.features[UNEMBEDDING],
                        teacher.features[HIDDEN], teacher.features[UNEMBEDDING],
                        where=batch.where, **kwargs)


def chunked_cross_entropy(hidden: jax.Array, unembedding: jax.Array, labels: jax.Array,
                          where: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and top-1 correctness from hidden states, [b, T] each.

  hidden [b, T, D], unembedding [D, V], labels and where [b, T]. Tokens go in blocks of
  `CE_BLOCK_ENTRIES // V` under `jax.checkpoint`, so one float32 [block, V] array of logits
  is alive at a time, forward and backward. Masked tokens are 0 with zero gradient.
  """
  lead = labels.shape
  vocab = unembedding.shape[-1]
  num_tokens = labels.size
  block = max(1, min(num_tokens, CE_BLOCK_ENTRIES // vocab))
  padded = -(-num_tokens // block) * block
  where = where.reshape(num_tokens).astype(bool)
  hidden = jnp.where(where[:, None], hidden.reshape(num_tokens, -1), 0)
  labels = jnp.where(where, labels.reshape(num_tokens), 0)
  pad = padded - num_tokens
  hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(padded // block, block, -1)
  labels = jnp.pad(labels, (0, pad)).reshape(padded // block, block)

  @jax.checkpoint
  def one_block(args):
    h, y = args
    logits = jnp.dot(h, unembedding, preferred_element_type=jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return normaliser - target, jax.lax.stop_gradient(correct)

  ce, correct = jax.lax.map(one_block, (hidden, labels))
  ce = jnp.where(where, ce.reshape(padded)[:num_tokens], 0.0).reshape(lead)
  correct = jnp.where(where, correct.reshape(padded)[:num_tokens], 0.0).reshape(lead)
  return ce, correct


def ce_and_accuracy(batch: base.Batch, ops: base.BatchOps, *, fused: bool,
                    ce_weight: float) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """(mean CE on the labels, metrics {'ce', 'accuracy'}) for a token-level method: from the
  logits unfused; fused, from hidden states and only when `ce_weight > 0` (else (0, {}))."""
  if not fused:
    ce = base.cross_entropy(batch, ops)
    return ce, {"ce": ce, "accuracy": base.accuracy(batch, ops)}
  if ce_weight == 0:
    return jnp.zeros((), jnp.float32), {}
  per_token, correct = chunked_cross_entropy(
      batch.student.features[HIDDEN], batch.student.features[UNEMBEDDING], batch.labels,
      batch.where)
  ce = ops.mean(per_token, batch.where)
  return ce, {"ce": ce, "accuracy": ops.mean(correct, batch.where)}
