"""Self-attention relation losses of MiniLM (Wang et al. 2020, 2021).

A transformer layer's queries, keys and values `[B, h, T, d]` (batch, heads, tokens, head
width) define relations between its tokens: `R = softmax(A B^T / sqrt(d))`, one distribution
over the `T` keys for every head and query token. MiniLM distils a teacher layer into a student
layer by the KL divergence between the teacher's and the student's relations, so student and
teacher may differ in width (`d`) and, with MiniLMv2's relation heads, in head count; the
token count `T` must be equal.

Every loss returns one value per example, shape `[B]` (the mean over heads and query tokens),
takes an optional `where` `[B]` mask over examples and an optional `token_where` `[B, T]` mask
over tokens (padding: a masked token is neither a query nor a key, so the value equals the
loss on the sequence with those tokens deleted). Masked entries are exactly 0 and get no
gradient whatever they hold. Relations are computed from queries and keys with a log-softmax,
never from attention probabilities (whose zeros would make `log` infinite), in float32 (or
float64) whatever the input dtype; scores beyond sqrt(float max) (1.8e19 in float32) saturate
instead of overflowing, so extreme inputs give large finite values, not NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks

__all__ = ["minilm_relation", "minilm_v1", "minilm_v2"]

_LAYOUT = "[B, heads, T, head_dim] (or [B, T, D] for one head)"


def _check_input(name: str, arg_name: str, x) -> jax.Array:
  x = _checks.as_array(name, arg_name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: {arg_name} must have a floating dtype, got dtype {x.dtype} with "
                    f"shape {tuple(x.shape)}")
  if x.ndim not in (3, 4):
    raise ValueError(f"{name}: {arg_name} must be {_LAYOUT}, got shape {tuple(x.shape)}")
  return x if x.ndim == 4 else x[:, None]


def _mask(name: str, arg_name: str, mask, shape, layout: str) -> Optional[jax.Array]:
  """A boolean mask of `shape`, or None."""
  if mask is None:
    return None
  mask = _checks.as_array(name, arg_name, mask)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{name}: {arg_name} must have shape {tuple(shape)} ({layout}), got shape "
                     f"{tuple(mask.shape)}")
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _split_relation_heads(name: str, arg_name: str, x: jax.Array,
                          num_relation_heads: int) -> jax.Array:
  """`[B, h, T, d]` -> `[B, r, T, h*d / r]`: concatenate the heads, split into `r` heads."""
  batch, heads, tokens, head_dim = x.shape
  width = heads * head_dim
  if width % num_relation_heads:
    raise ValueError(
        f"{name}: num_relation_heads={num_relation_heads} must divide the width heads * "
        f"head_dim = {width} of {arg_name} (shape {tuple(x.shape)}); pick a common divisor of "
        "the student's and the teacher's widths")
  x = x.transpose(0, 2, 1, 3).reshape(batch, tokens, num_relation_heads,
                                      width // num_relation_heads)
  return x.transpose(0, 2, 1, 3)


def _max_abs(x: jax.Array) -> jax.Array:
  """max |x| per example (1 for an all-zero example), `[B, 1, 1, 1]`, without gradient."""
  largest = jnp.max(jnp.abs(x), axis=(1, 2, 3), keepdims=True)
  return jax.lax.stop_gradient(jnp.where(largest > 0, largest, 1.0))


def _log_relation(a: jax.Array, b: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
  """`log_softmax(a b^T / sqrt(d))` over keys, `[B, h, T, T]`; 0 at masked keys."""
  head_dim = a.shape[-1]
  # Products of large entries overflow (and +inf - inf is NaN). Dot products of the entries
  # scaled into [-1, 1] cannot; the scale factor is capped so that |score| <= sqrt(float max)
  # (1.8e19 in float32), which keeps log-probabilities, KLs and their sums over heads,
  # tokens and the batch finite. Below the cap (any real attention) this is a b^T / sqrt(d)
  # up to rounding; above it the rows saturate (one-hot), as their limit does.
  scale_a, scale_b = _max_abs(a), _max_abs(b)
  bound = math.sqrt(float(jnp.finfo(a.dtype).max))
  factor = jnp.minimum(scale_a * scale_b / math.sqrt(head_dim), bound / head_dim)
  scores = jnp.einsum("bhqd,bhkd->bhqk", a / scale_a, b / scale_b) * factor
  # A no-op on values, the clip keeps XLA from contracting `dot * factor - max` into one
  # fused multiply-add inside the log-softmax, whose rounding residual (|score| * 2**-24)
  # would make exp(x - max) overflow for huge scores.
  scores = jnp.clip(scores, -bound, bound)
  if key_mask is None:
    return jax.nn.log_softmax(scores, axis=-1)
  key_mask = key_mask[:, None, None, :]
  log_p = jax.nn.log_softmax(jnp.where(key_mask, scores, -jnp.inf), axis=-1)
  return jnp.where(key_mask, log_p, 0.0)


def minilm_relation(student_a: ArrayLike, teacher_a: ArrayLike,
                    student_b: Optional[ArrayLike] = None,
                    teacher_b: Optional[ArrayLike] = None, *,
                    num_relation_heads: Optional[int] = None,
                    where: Optional[ArrayLike] = None,
                    token_where: Optional[ArrayLike] = None) -> jax.Array:
  r"""KL divergence between the teacher's and the student's self-relations, per example.

  With `R(a, b) = softmax(a b^T / sqrt(d))` over keys, per head (`d` each model's own head
  width),

  .. math::
    \ell_i = \frac{1}{h T} \sum_{a=1}^{h} \sum_{q=1}^{T}
      \mathrm{KL}\big(R(t_a, t_b)_{i,a,q} \,\Vert\, R(s_a, s_b)_{i,a,q}\big)

  `(a, b) = (query, key)` is MiniLM's self-attention transfer, `(value, value)` its
  value-relation transfer, and MiniLMv2's Q-Q, K-K, V-V relations are `b = a` (the default)
  with `num_relation_heads`.

  Args:
    student_a: `[B, h_s, T, d_s]` student queries (or values, ...), or `[B, T, D_s]` for one
      head.
    teacher_a: `[B, h_t, T, d_t]` teacher counterpart.
    student_b: the student's second factor (keys for attention), shape of `student_a`;
      `None` means `student_a` (a self-relation).
    teacher_b: the teacher's second factor; `None` means `teacher_a`.
    num_relation_heads: `None` compares head by head (`h_s == h_t` required); an integer `r`
      first concatenates each model's heads and splits them into `r` relation heads of width
      `h d / r` (MiniLMv2), so head counts and widths may differ.
    where: optional `[B]` mask over examples.
    token_where: optional `[B, T]` mask over tokens (False on padding).

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> # One head, two tokens of width 1. Student scores are all 0: uniform rows. The
    >>> # teacher's first query scores its keys ln 3 and 0: [3/4, 1/4]; its second is uniform.
    >>> s = jnp.zeros((1, 1, 2, 1))
    >>> t = jnp.array([[[[jnp.sqrt(jnp.log(3.0))], [0.0]]]])
    >>> value = losses.minilm_relation(s, t)   # (3/4 ln 1.5 + 1/4 ln 0.5 + 0) / 2
    >>> print(value.shape, round(float(value[0]), 5))
    (1,) 0.06541

  Reference:
    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020; Wang et al., "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation for Compressing Pretrained Transformers", Findings
    of ACL 2021.
  """
  return _relation("minilm_relation", student_a, teacher_a, student_b, teacher_b,
                   num_relation_heads=num_relation_heads, where=where, token_where=token_where)


def _relation(name, student_a, teacher_a, student_b, teacher_b, *, num_relation_heads,
              where, token_where, names=("student_a", "teacher_a", "student_b", "teacher_b")):
  if num_relation_heads is not None and (
      not isinstance(num_relation_heads, int) or isinstance(num_relation_heads, bool)
      or num_relation_heads < 1):
    raise ValueError(f"{name}: num_relation_heads must be None or a positive integer, got "
                     f"{num_relation_heads!r}")
  s_a = _check_input(name, names[0], student_a)
  t_a = _check_input(name, names[1], teacher_a)
  s_b = s_a if student_b is None else _check_input(name, names[2], student_b)
  t_b = t_a if teacher_b is None else _check_input(name, names[3], teacher_b)
  for (a, b), (a_name, b_name) in (((s_a, s_b), names[0::2]), ((t_a, t_b), names[1::2])):
    if a.shape != b.shape:
      raise ValueError(f"{name}: {a_name} shape {tuple(a.shape)} and {b_name} shape "
                       f"{tuple(b.shape)} must be equal (one model's two factors)")
  s_shape, t_shape = tuple(s_a.shape), tuple(t_a.shape)
  if s_shape[0] != t_shape[0] or s_shape[2] != t_shape[2]:
    raise ValueError(
        f"{name}: {names[0]} shape {s_shape} and {names[1]} shape {t_shape} must have the "
        f"same batch size and token count ({_LAYOUT}); relations are T x T")
  if num_relation_heads is None and s_shape[1] != t_shape[1]:
    raise ValueError(
        f"{name}: {names[0]} shape {s_shape} and {names[1]} shape {t_shape} have different "
        f"head counts {s_shape[1]} and {t_shape[1]}; pass num_relation_heads (MiniLMv2) to "
        "compare models with different heads")
  batch, tokens = s_shape[0], s_shape[2]
  row_mask = _mask(name, "where", where, (batch,), "[B], one per example")
  token_mask = _mask(name, "token_where", token_where, (batch, tokens), "[B, T], one per token")

  # Replace masked examples and tokens before any arithmetic: NaN/inf there must not leak.
  keep = None
  if row_mask is not None:
    keep = jnp.broadcast_to(row_mask[:, None], (batch, tokens))
  if token_mask is not None:
    keep = token_mask if keep is None else keep & token_mask

  def prepare(x, arg_name):
    x = _checks.upcast(x)
    if keep is not None:
      x = jnp.where(keep[:, None, :, None], x, 0)
    if num_relation_heads is not None:
      x = _split_relation_heads(name, arg_name, x, num_relation_heads)
    return x

  s_a, s_b = prepare(s_a, names[0]), prepare(s_b, names[2])
  t_a, t_b = prepare(t_a, names[1]), prepare(t_b, names[3])
  key_mask = None
  if token_mask is not None:
    # A row without any token keeps all keys (its value is 0 anyway): no all -inf softmax.
    key_mask = token_mask | ~jnp.any(token_mask, axis=-1, keepdims=True)
  log_t = _log_relation(t_a, t_b, key_mask)
  log_s = _log_relation(s_a, s_b, key_mask)
  p_t = jnp.exp(log_t)
  if key_mask is not None:
    p_t = jnp.where(key_mask[:, None, None, :], p_t, 0.0)
  kl = jnp.sum(p_t * (log_t - log_s), axis=-1)  # [B, heads, T]
  kl = jnp.mean(kl, axis=1)  # [B, T]
  if token_mask is None:
    per_example = jnp.mean(kl, axis=-1)
  else:
    count = jnp.sum(token_mask, axis=-1).astype(kl.dtype)
    per_example = jnp.sum(jnp.where(token_mask, kl, 0.0), axis=-1) / jnp.maximum(count, 1.0)
  return per_example if row_mask is None else jnp.where(row_mask, per_example, 0.0)


def minilm_v1(student_query: ArrayLike, teacher_query: ArrayLike, student_key: ArrayLike,
              teacher_key: ArrayLike, student_value: ArrayLike, teacher_value: ArrayLike, *,
              where: Optional[ArrayLike] = None,
              token_where: Optional[ArrayLike] = None) -> jax.Array:
  r"""MiniLM: self-attention distribution transfer plus value-relation transfer.

  .. math::
    \ell_i = \mathrm{AT}_i + \mathrm{VR}_i, \quad
    \mathrm{AT} = \texttt{minilm\_relation}(q_s, q_t, k_s, k_t), \quad
    \mathrm{VR} = \texttt{minilm\_relation}(v_s, v_t)

  i.e. the KL between the teacher's and the student's attention distributions
  `softmax(q k^T / sqrt(d))` and value relations `softmax(v v^T / sqrt(d))`, averaged over
  heads and query tokens. Student and teacher need the same number of heads (their widths may
  differ); the paper applies it to the last layer of both.

  Args:
    student_query: `[B, h, T, d_s]` queries of the student layer (unscaled).
    teacher_query: `[B, h, T, d_t]` queries of the teacher layer.
    student_key: `[B, h, T, d_s]` keys.
    teacher_key: `[B, h, T, d_t]` keys.
    student_value: `[B, h, T, d_s]` values.
    teacher_value: `[B, h, T, d_t]` values.
    where: optional `[B]` mask over examples.
    token_where: optional `[B, T]` mask over tokens.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> x = jnp.arange(24.0).reshape(1, 2, 3, 4) / 10
    >>> losses.minilm_v1(x, x, x, x, x, x)   # identical relations
    Array([0.], dtype=float32)

  Reference:
    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020.
  """
  name = "minilm_v1"
  attention = _relation(name, student_query, teacher_query, student_key, teacher_key,
                        num_relation_heads=None, where=where, token_where=token_where,
                        names=("student_query", "teacher_query", "student_key", "teacher_key"))
  value = _relation(name, student_value, teacher_value, None, None, num_relation_heads=None,
                    where=where, token_where=token_where,
                    names=("student_value", "teacher_value", "", ""))
  return attention + value


def minilm_v2(student_query: ArrayLike, teacher_query: ArrayLike, student_key: ArrayLike,
              teacher_key: ArrayLike, student_value: ArrayLike, teacher_value: ArrayLike, *,
              num_relation_heads: int, where: Optional[ArrayLike] = None,
              token_where: Optional[ArrayLike] = None) -> jax.Array:
  r"""MiniLMv2: multi-head self-attention relation distillation (Q-Q, K-K and V-V).

  .. math::
    \ell_i = \sum_{x \in \{q, k, v\}}
      \texttt{minilm\_relation}(x_s, x_t, \texttt{num\_relation\_heads}=r)_i

  Each model's queries (keys, values) are concatenated over its heads and split into `r`
  relation heads of width `h d / r`; the KL between the teacher's and the student's
  `softmax(x x^T / sqrt(h d / r))` is averaged over relation heads and query tokens. Head
  counts and widths may differ between student and teacher; `r` must divide both widths.
  The paper uses 48 relation heads for base-size teachers (width 768: 16 per relation head)
  and 64 for large ones, the student's last layer and a teacher's last (base) or an
  upper-middle (large) layer.

  Args:
    student_query: `[B, h_s, T, d_s]` queries of the student layer (unscaled).
    teacher_query: `[B, h_t, T, d_t]` queries of the teacher layer.
    student_key: `[B, h_s, T, d_s]` keys.
    teacher_key: `[B, h_t, T, d_t]` keys.
    student_value: `[B, h_s, T, d_s]` values.
    teacher_value: `[B, h_t, T, d_t]` values.
    num_relation_heads: the number of relation heads `r`.
    where: optional `[B]` mask over examples.
    token_where: optional `[B, T]` mask over tokens.

  Returns:
    `[B]` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.arange(24.0).reshape(1, 2, 3, 4) / 10   # 2 heads of width 4
    >>> t = s.transpose(0, 2, 1, 3).reshape(1, 1, 3, 8)  # the same 8 columns as 1 head
    >>> losses.minilm_v2(s, t, s, t, s, t, num_relation_heads=2)
    Array([0.], dtype=float32)

  Reference:
    Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
    Pretrained Transformers", Findings of ACL 2021.
  """
  name = "minilm_v2"
  if num_relation_heads is None:
    raise ValueError(f"{name}: num_relation_heads must be a positive integer, got None")
  total = 0.0
  for kind, student, teacher in (("query", student_query, teacher_query),
                                 ("key", student_key, teacher_key),
                                 ("value", student_value, teacher_value)):
    total = total + _relation(name, student, teacher, None, None,
                              num_relation_heads=num_relation_heads, where=where,
                              token_where=token_where,
                              names=(f"student_{kind}", f"teacher_{kind}", "", ""))
  return total
