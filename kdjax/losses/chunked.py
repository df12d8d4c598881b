"""Token-chunked evaluation of per-token logit losses, for large vocabularies.

A plain `jax.value_and_grad` of `kd` on `[B, T, V]` bf16 logits keeps several
float32 `[B*T, V]` intermediates alive at once (upcast inputs, log-probs,
probabilities and their cotangents): for `[8, 512, 32000]` that is many times
the 262 MB of one bf16 logits tensor (see `experiments/loss_benchmark.py`).

`chunked(loss_fn)` runs `loss_fn` over blocks of `chunk_size` tokens with
`jax.lax.map`, and wraps each block in `jax.checkpoint`, so the forward pass
keeps nothing but the block's inputs and the backward pass recomputes one
block's float32 intermediates at a time. Peak temporary memory then scales with
`chunk_size * V` instead of `B * T * V`; values and gradients are the same as the
unchunked loss (up to float rounding).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks
from kdjax.losses import logit

Numeric = Union[float, jax.Array]

__all__ = ["chunked", "chunked_kd", "chunked_forward_kl"]


def chunked(loss_fn: Callable[..., jax.Array], *, chunk_size: int = 1024
            ) -> Callable[..., jax.Array]:
  """Wraps a per-token logit loss to evaluate it `chunk_size` tokens at a time.

  The wrapped function has the signature of `loss_fn`: positional arrays whose
  leading axes equal `student_logits.shape[:-1]` (logits `[..., V]`, labels
  `[...]`, top-k arrays `[..., k]`), keyword hyper-parameters and `where`. It
  does not apply to losses whose arrays have other leading axes
  (`multi_teacher_kd`) or to batch-relational losses (`dist`).

  Args:
    loss_fn: an unreduced loss from `kdjax.losses.logit`, e.g. `kd`.
    chunk_size: tokens per block; larger is faster, smaller uses less memory.

  Returns:
    A function with `loss_fn`'s signature and result.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jax.random.normal(jax.random.key(0), (2, 5, 7))
    >>> t = jax.random.normal(jax.random.key(1), (2, 5, 7))
    >>> chunked_jsd = losses.chunked(losses.generalized_jsd, chunk_size=4)
    >>> bool(jnp.allclose(chunked_jsd(s, t), losses.generalized_jsd(s, t),
    ...                   atol=1e-6))
    True
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunked: chunk_size must be a positive int, got "
                     f"{chunk_size!r}")
  fn_name = getattr(loss_fn, "__name__", "loss_fn")

  @functools.wraps(loss_fn)
  def wrapped(student_logits: ArrayLike, *arrays: ArrayLike,
              where: Optional[ArrayLike] = None, **hyper: Any) -> jax.Array:
    name = f"chunked({fn_name})"
    student_logits = _checks.check_logits(name, "student_logits",
                                          student_logits)
    arrays = tuple(_checks.as_array(name, f"argument {i + 1}", a)
                   for i, a in enumerate(arrays))
    # Full-shape validation (and the result shape) without computing anything.
    out = jax.eval_shape(functools.partial(loss_fn, where=where, **hyper),
                         student_logits, *arrays)
    lead_shape = tuple(student_logits.shape[:-1])
    num_tokens = math.prod(lead_shape)
    lead_ndim = len(lead_shape)
    for i, a in enumerate(arrays):
      if tuple(a.shape[:lead_ndim]) != lead_shape:
        raise ValueError(
            f"{name}: argument {i + 1} has shape {tuple(a.shape)}, whose "
            f"leading axes are not student_logits' {lead_shape}; chunked only "
            f"applies to per-token arrays")
    if num_tokens == 0:
      return jnp.zeros(out.shape, out.dtype)
    mask = _checks.check_where(name, where, lead_shape)
    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)
    padding = num_chunks * chunk - num_tokens

    def blocks(a):
      a = a.reshape((num_tokens,) + a.shape[lead_ndim:])
      if padding:
        a = jnp.pad(a, [(0, padding)] + [(0, 0)] * (a.ndim - 1))
      return a.reshape((num_chunks, chunk) + a.shape[1:])

    inputs = [blocks(student_logits)] + [blocks(a) for a in arrays]
    if mask is None and padding:
      mask = jnp.ones(lead_shape, bool)
    if mask is not None:
      inputs.append(blocks(mask))  # padded tokens come out False

    @jax.checkpoint
    def block_loss(block):
      if mask is None:
        return loss_fn(*block, **hyper)
      *block_arrays, block_mask = block
      return loss_fn(*block_arrays, where=block_mask, **hyper)

    losses = jax.lax.map(block_loss, tuple(inputs))
    return losses.reshape(-1)[:num_tokens].reshape(lead_shape)

  return wrapped


def chunked_kd(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
               temperature: Numeric = 4.0, where: Optional[ArrayLike] = None,
               chunk_size: int = 1024) -> jax.Array:
  """`kd` evaluated `chunk_size` tokens at a time (same values, less memory).

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.
    chunk_size: tokens per block.

  Returns:
    `[...]` per-token loss, equal to `kd(student_logits, teacher_logits, ...)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.array([[3.0, 2.0, 1.0]])
    >>> print(round(float(losses.chunked_kd(s, t, temperature=1.0).sum()), 4))
    1.1504

  Reference:
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
  """
  return chunked(logit.kd, chunk_size=chunk_size)(
      student_logits, teacher_logits, temperature=temperature, where=where)


def chunked_forward_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                       temperature: Numeric = 1.0,
                       where: Optional[ArrayLike] = None,
                       chunk_size: int = 1024) -> jax.Array:
  """`forward_kl` evaluated `chunk_size` tokens at a time.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits, same shape.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask.
    chunk_size: tokens per block.

  Returns:
    `[...]` per-token loss, equal to `forward_kl(...)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> t = jnp.array([[3.0, 2.0, 1.0]])
    >>> print(round(float(losses.chunked_forward_kl(s, t).sum()), 4))
    1.1504

  Reference:
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD),
    ICLR 2024.
  """
  return chunked(logit.forward_kl, chunk_size=chunk_size)(
      student_logits, teacher_logits, temperature=temperature, where=where)
