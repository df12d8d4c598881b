"""Token-chunked evaluation of per-token logit losses, for large vocabularies.

A plain `jax.value_and_grad` of `kd` on `[B, T, V]` bf16 logits keeps several
float32 `[B*T, V]` intermediates alive at once (upcast inputs, log-probs,
probabilities and their cotangents): for `[8, 512, 32000]` that is many times
the 262 MB of one bf16 logits tensor (see `benchmarks/loss_benchmark.py`).

`chunked(loss_fn)` runs `loss_fn` over blocks of `chunk_size` tokens with
`jax.lax.map`, with a custom VJP whose backward pass maps `jax.vjp` over the
blocks again, so the forward pass keeps nothing but its inputs and the backward
pass recomputes one block's float32 intermediates at a time. Peak temporary memory then scales with
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


def _is_half(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def _to_transport(x: jax.Array) -> jax.Array:
  # 16-bit floats travel through the loop as uint16 bit patterns. The CPU
  # backend has no native bf16 slicing: it rewrites a bf16 dynamic-slice (and
  # the dynamic-update-slice that stacks per-block results) as float32 ops on
  # a converted copy of the *whole* array, and then hoists that conversion out
  # of the loop, which would undo the chunking.
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_half(x.dtype) else x


def _from_transport(x: jax.Array, dtype) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, dtype) if _is_half(dtype) else x


def _map_blocks(fn, arrays, num_chunks, chunk):
  """lax.map of `fn` over the leading (token) axis of `arrays`, in blocks.

  `arrays` have a leading token axis of length `num_tokens <= num_chunks *
  chunk`; they are padded with zeros, split into `[num_chunks, chunk, ...]`
  blocks and `fn(list_of_blocks)` returns a pytree of per-block arrays, which
  come back concatenated over tokens and cut to `num_tokens`.
  """
  num_tokens = arrays[0].shape[0]
  padding = num_chunks * chunk - num_tokens
  dtypes = [a.dtype for a in arrays]

  def blocks(a):
    a = _to_transport(a)
    if padding:
      a = jnp.pad(a, [(0, padding)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((num_chunks, chunk) + a.shape[1:])

  out_dtypes = jax.tree.map(
      lambda o: o.dtype,
      jax.eval_shape(fn, [jax.ShapeDtypeStruct((chunk,) + a.shape[1:], a.dtype)
                          for a in arrays]))

  def body(block):
    out = fn([_from_transport(b, d) for b, d in zip(block, dtypes)])
    return jax.tree.map(_to_transport, out)

  stacked = jax.lax.map(body, [blocks(a) for a in arrays])

  def unblock(o, dtype):
    o = o.reshape((num_chunks * chunk,) + o.shape[2:])[:num_tokens]
    return _from_transport(o, dtype)

  return jax.tree.map(unblock, stacked, out_dtypes)


def chunked(loss_fn: Callable[..., jax.Array], *, chunk_size: int = 1024
            ) -> Callable[..., jax.Array]:
  """Wraps a per-token logit loss to evaluate it `chunk_size` tokens at a time.

  The wrapped function has the signature of `loss_fn`: positional arrays whose
  leading axes equal `student_logits.shape[:-1]` (logits `[..., V]`, labels
  `[...]`, top-k arrays `[..., k]`), keyword hyper-parameters and `where`. It
  does not apply to losses whose arrays have other leading axes
  (`multi_teacher_kd`) or to batch-relational losses (`dist`).

  The forward pass maps `loss_fn` over the blocks; a custom VJP maps
  `jax.vjp(loss_fn)` over them again in the backward pass (recomputing each
  block's forward), so only one block's float32 intermediates are alive at a
  time. Gradients flow to every floating positional array; array-valued
  hyper-parameters (e.g. TAID's traced `t`) get a zero gradient. Being a
  custom VJP, it supports reverse-mode, first-order differentiation only.

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
    if mask is None and num_chunks * chunk != num_tokens:
      mask = jnp.ones(lead_shape, bool)  # so padded tokens are masked out

    inputs = [a.reshape((num_tokens,) + a.shape[lead_ndim:])
              for a in (student_logits,) + arrays]
    if mask is not None:
      inputs.append(mask.reshape(num_tokens))
    has_mask = mask is not None
    array_hyper_names = sorted(
        k for k, v in hyper.items()
        if isinstance(v, (jax.Array, jax.core.Tracer)))
    static_hyper = {k: v for k, v in hyper.items()
                    if k not in array_hyper_names}
    differentiable = [i for i, a in enumerate(inputs)
                      if jnp.issubdtype(a.dtype, jnp.floating)]

    def block_loss(block, hyper_values):
      kwargs = dict(static_hyper, **dict(zip(array_hyper_names, hyper_values)))
      if has_mask:
        *block_arrays, block_mask = block
        return loss_fn(*block_arrays, where=block_mask, **kwargs)
      return loss_fn(*block, **kwargs)

    @jax.custom_vjp
    def run(inputs, hyper_values):
      return _map_blocks(lambda block: block_loss(block, hyper_values),
                         inputs, num_chunks, chunk)

    def run_fwd(inputs, hyper_values):
      return run(inputs, hyper_values), (inputs, hyper_values)

    def run_bwd(residuals, cotangent):
      inputs, hyper_values = residuals

      def block_grads(block):
        *block, block_cotangent = block

        def of_floats(*floats):
          args = list(block)
          for i, x in zip(differentiable, floats):
            args[i] = x
          return block_loss(args, hyper_values)

        _, vjp = jax.vjp(of_floats, *[block[i] for i in differentiable])
        return list(vjp(block_cotangent))

      grads = _map_blocks(block_grads, inputs + [cotangent], num_chunks, chunk)
      input_cotangents = [None] * len(inputs)
      for i, g in zip(differentiable, grads):
        input_cotangents[i] = g
      return input_cotangents, jax.tree.map(jnp.zeros_like, hyper_values)

    run.defvjp(run_fwd, run_bwd)
    losses = run(inputs, [jnp.asarray(hyper[k]) for k in array_hyper_names])
    return losses.reshape(lead_shape)

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
