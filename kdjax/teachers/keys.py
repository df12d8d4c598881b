"""Where a teacher's outputs computed ahead of the step travel: keys of the input batch.

Written by the sources that compute them before the step (the on-disk cache,
`disk_cache.TeacherCache.rows`; the per-process LM logits, `process_logits`), read by
`Teacher.outputs`. Pure jax.numpy; imports nothing of kdjax but `Output`.
"""

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from kdjax.models.output import Output

LOGITS_KEY = "teacher_logits"  # [b, C] (or [b, T, V]) every logit.
TOPK_LOGITS_KEY = "teacher_topk_logits"  # [b, k] the top k logits, descending.
TOPK_INDICES_KEY = "teacher_topk_indices"  # [b, k] int32 their class ids.
FEATURES_PREFIX = "teacher_features/"  # + tap name: [b, ...] a feature tap.
LOGIT_KEYS = (LOGITS_KEY, TOPK_LOGITS_KEY, TOPK_INDICES_KEY)


def is_teacher_key(key: str) -> bool:
  """True for batch entries that hold teacher outputs (the step consumes them itself)."""
  return key in LOGIT_KEYS or key.startswith(FEATURES_PREFIX)


def holds_outputs(batch: Mapping[str, jax.Array]) -> bool:
  """True when `batch` carries the teacher's logits (all of them or the top k)."""
  return LOGITS_KEY in batch or TOPK_LOGITS_KEY in batch


def topk_to_logits(topk_logits: jax.Array, topk_indices: jax.Array,
                   num_classes: int) -> jax.Array:
  """[..., k] logits at class ids [..., k] -> [..., num_classes] logits, -inf elsewhere: the
  softmax of the result is the renormalised top-k distribution (`losses.sparse_kd`'s target),
  so a KD-like method learns from a top-k cache unchanged."""
  dense = jnp.full(topk_logits.shape[:-1] + (num_classes,), -jnp.inf, topk_logits.dtype)
  return jnp.put_along_axis(dense, topk_indices, topk_logits, axis=-1, inplace=False)


def outputs_from_batch(batch: Mapping[str, jax.Array], *,
                       num_classes: Optional[int] = None) -> Optional[Output]:
  """The teacher's Output carried by `batch` (None when it carries no logits); a top-k cache
  needs `num_classes`."""
  features = {key[len(FEATURES_PREFIX):]: value for key, value in batch.items()
              if key.startswith(FEATURES_PREFIX)}
  if LOGITS_KEY in batch:
    return Output(batch[LOGITS_KEY], features)
  if TOPK_LOGITS_KEY in batch:
    if num_classes is None:
      raise ValueError("A batch with the teacher's top-k logits needs num_classes.")
    return Output(topk_to_logits(batch[TOPK_LOGITS_KEY], batch[TOPK_INDICES_KEY], num_classes),
                  features)
  return None
