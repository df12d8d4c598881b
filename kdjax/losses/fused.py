r"""Fused, vocabulary-chunked LM distillation losses from hidden states.

`fused_<divergence>(student_hidden, student_unembedding, teacher_hidden,
teacher_unembedding, ...)` equals `<divergence>(student_hidden @
student_unembedding, teacher_hidden @ teacher_unembedding, ...)` from
`kdjax.losses.logit`, but never materialises the `[N, V]` logits: it walks
blocks of `token_chunk_size` tokens by `vocab_chunk_size` vocabulary entries,
so only one float32 `[token_chunk, vocab_chunk]` block of student and of
teacher logits is alive at a time, forward and backward. It is the JAX
counterpart of Liger-Kernel's `LigerFusedLinearJSD` and of NVIDIA Model
Optimizer's fused logits-distillation loss.

Algorithm, per block of tokens (`u = z_s / T`, `w = z_t / T` the scaled logits,
`log p_s = u - A_s`, `log p_t = w - A_t`):

1. normalisers: an online log-sum-exp over vocabulary blocks, for student and
   teacher, kept as (max, `rest = sum_{c != argmax} exp(z_c - max)`, argmax) so
   that `A = max + log1p(rest)` and `1 - p_argmax = rest / (1 + rest)` stay
   exact when the softmax saturates;
2. value: every divergence here is a sum over classes of elementwise terms of
   `(log p_s, log p_t)` once the normalisers are known (the JSD / skew-KL
   mixtures `beta p_t + (1 - beta) p_s` are already normalised, so they need no
   third normaliser), so the per-token value is the sum of per-block partial
   sums. Under differentiation the same pass also sums `g = dL/d(log p_s)`
   (the `jax.vjp` of the block's terms, normaliser held constant) at the
   student's argmax column `a` and over the other columns, `G_rest`.
3. gradient (custom VJP): by the chain rule through `log p_s = u - A_s(u)`,

   .. math::
     \frac{\partial L}{\partial u_j} = g_j - p_{s,j}\, G,\qquad
     G = \sum_c g_c = g_a + G_{rest},

   computed at the argmax as `g_a (1 - p_a) - p_a G_rest` (same value, no
   cancellation of two large numbers when `p_a -> 1`; see `_fused_loss`). For
   reference, the closed forms this produces are: forward KL `p_s - p_t`;
   reverse KL `p_s (log p_s - log p_t - L)`; JSD
   `(1 - beta) p_s (log p_s - log m - KL(p_s || m))`; skew forward KL
   `p_s - p_t + alpha (p_t^2 / mix - p_s S)` with `S = sum p_t^2 / mix`; all
   times `1/T` (and `T**2` for `kd`). The backward pass loops over vocabulary
   blocks outside and token blocks inside, so each block of the unembedding
   gradient `[D_s, vocab_chunk]` is finished (float32 accumulation) and written
   once, in the unembedding's dtype, into one pre-allocated `[D_s, V]` buffer;
   the hidden-state gradient is accumulated in float32 `[N, D_s]`.

Teacher inputs get no gradient (their cotangents are zero by construction, as
if under `stop_gradient`); a teacher is frozen in distillation. Masked tokens
are exactly 0 with exactly zero gradient, even if their hidden states hold
`inf`/`NaN` (rows are replaced by 0 before any arithmetic). Inputs may be
bfloat16: the logits are bfloat16 products (exact in float32) accumulated in
float32, and everything after them is float32 (float64 stays float64). Being a
custom VJP, the functions support first-order reverse-mode differentiation.

Memory: besides the inputs and the outputs, `value_and_grad` holds the
`[D_s, V]` unembedding-gradient buffer (in the unembedding's dtype), the float32
`[N, D_s]` hidden-state gradient, one float32 `[D_s, vocab_chunk]` gradient
block, one block of each unembedding and a few float32 `[token_chunk,
vocab_chunk]` blocks; no input is copied whole, cast or padded. For `[4, 2048]`
tokens, hidden 2048, `V = 128256`, bfloat16 and the default chunks, XLA's CPU
temp memory is 0.80 GB (1.53 GB before this layout; the goal
`1.5 * (two float32 logit blocks + the unembedding gradient + both hidden
states)` is 0.99 GB); see `benchmarks/fused_loss_benchmark.py`.

Speed: the forward pass reads each block's logits twice (normalisers, then the
value), the backward pass once more, so with several vocabulary blocks the
loss costs about 2x the full-logits computation. With `vocab_chunk_size >= V`
(one vocabulary block) the forward pass computes each token chunk's logits
once: 1.5x. On one H100 at the shape above (JSD, value and gradient;
`benchmarks/gpu_benchmark.py`): default chunks 132 ms with 0.32 GB of
temporary memory, the whole vocabulary in chunks of 1024 tokens 94 ms with
2.2 GB, full logits 63 ms with 18.9 GB, TRL's torch loss 121 ms with 31.6 GB.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.losses import _checks
from kdjax.losses import logit
from kdjax.losses.chunked import _from_transport
from kdjax.losses.chunked import _is_half
from kdjax.losses.chunked import _to_transport

Numeric = Union[float, jax.Array]
# (log p_s block, log p_t block, hyper-parameter arrays) -> per-token partial sum.
Terms = Callable[[jax.Array, jax.Array, Dict[str, jax.Array]], jax.Array]

__all__ = [
    "fused_kd",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_generalized_jsd",
    "fused_skew_forward_kl",
    "fused_skew_reverse_kl",
    "fused_total_variation",
]

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 1024
# Most blocks `_Blocks.read` cuts by a switch of static slices on CPU.
_MAX_STATIC_BLOCKS = 64


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------


def _check_chunk(name: str, arg_name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}: {arg_name} must be a positive int, got "
                     f"{value!r}")
  return value


def _check_pair(name: str, who: str, hidden: Any, unembedding: Any):
  hidden = _checks.check_logits(name, f"{who}_hidden", hidden)
  unembedding = _checks.as_array(name, f"{who}_unembedding", unembedding)
  if not jnp.issubdtype(unembedding.dtype, jnp.floating):
    raise TypeError(f"{name}: {who}_unembedding must have a floating dtype, "
                    f"got {unembedding.dtype}")
  if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[-1]:
    raise ValueError(
        f"{name}: {who}_unembedding must have shape [D, V] with D = "
        f"{who}_hidden.shape[-1] = {hidden.shape[-1]}, got shape "
        f"{tuple(unembedding.shape)} ({who}_hidden shape "
        f"{tuple(hidden.shape)})")
  return hidden, unembedding


# ----------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------


class _Blocks:
  """`count` blocks of `size` entries along one axis of `length` entries.

  Block `i` starts at `min(i * size, length - size)`: the last block is
  shifted left to end at `length` instead of being padded, so no padded copy of
  an input is ever made. Its entries that the previous block already covered
  are not `fresh` and count only once.
  """

  def __init__(self, length: int, size: int):
    self.length, self.size = length, size
    self.count = -(-length // size)
    self.starts = [min(i * size, length - size) for i in range(self.count)]

  def start(self, i: jax.Array) -> jax.Array:
    return jnp.minimum(i * self.size, self.length - self.size)

  def fresh(self, i: jax.Array) -> jax.Array:
    """`[size]` bool: the entries of block `i` that no earlier block covers."""
    return self.start(i) + jnp.arange(self.size) >= i * self.size

  def read(self, array: jax.Array, i: jax.Array, axis: int) -> jax.Array:
    """Block `i` of `array` along `axis`, in `array`'s dtype.

    On CPU a 16-bit float array is cut by a `lax.switch` over static slices.
    XLA's CPU backend has no 16-bit dynamic-slice: it rewrites one as a float32
    slice of a float32 copy of the *whole* array and hoists that copy out of
    the loop (1 GB for a `[2048, 128256]` unembedding); a bitcast to uint16
    is a whole 16-bit copy; a static slice copies one block. Past
    `_MAX_STATIC_BLOCKS` branches compilation slows down (~20 s for 256), so
    there the uint16 copy is the lesser cost.
    """

    def dynamic(array):
      return jax.lax.dynamic_slice_in_dim(array, self.start(i), self.size,
                                          axis=axis)

    if not _is_half(array.dtype):
      return dynamic(array)

    def on_cpu(array):
      if self.count > _MAX_STATIC_BLOCKS:
        return _from_transport(dynamic(_to_transport(array)), array.dtype)
      branches = [functools.partial(jax.lax.slice_in_dim, start_index=s,
                                    limit_index=s + self.size, axis=axis)
                  for s in self.starts]
      return jax.lax.switch(i, branches, array)

    return jax.lax.platform_dependent(array, cpu=on_cpu, default=dynamic)

  def unblock(self, blocks: jax.Array) -> jax.Array:
    """`[count, size, ...]` per-block results -> `[length, ...]`."""
    tail = blocks[-1, (self.count - 1) * self.size - self.starts[-1]:]
    return jnp.concatenate(
        [blocks[:-1].reshape((-1,) + blocks.shape[2:]), tail])


# ----------------------------------------------------------------------------
# The fused engine.
# ----------------------------------------------------------------------------


def _online_logsumexp(carry, block, first_column):
  """One step of a streaming log-sum-exp: (running max, rest, argmax).

  `rest = sum_{c != argmax} exp(z_c - max)` leaves out the argmax's own
  `exp(0) = 1`, so that `log sum = log1p(rest)` and `1 - p_argmax = rest / (1
  + rest)` keep their precision when the softmax saturates (`1 + rest` rounds
  `rest ~ 1e-7` to a few bits in float32). The max and the log of the sum
  stay separate (rather than one running `logaddexp`) so that `log p = (z -
  max) - log1p(rest)` loses nothing when logits are large: `z - max` is exact
  for close floats, while `z - lse` would carry lse's rounding (~1e-4 at
  |z| ~ 1e3).
  """
  running_max, rest, argmax = carry
  block_max = jnp.max(block, axis=-1)
  block_argmax = jnp.argmax(block, axis=-1)
  takes_over = block_max > running_max
  new_max = jnp.maximum(running_max, block_max)
  # The old argmax joins the rest (weight exp(old max - new max)); the new
  # one leaves it.
  rescale = jnp.where(jnp.isneginf(running_max), 0.0,
                      jnp.exp(running_max - new_max))
  rest = jnp.where(takes_over, (1.0 + rest) * rescale, rest)
  is_new_argmax = takes_over[:, None] & (
      jnp.arange(block.shape[-1]) == block_argmax[:, None])
  rest = rest + jnp.sum(
      jnp.where(is_new_argmax, 0.0, jnp.exp(block - new_max[:, None])),
      axis=-1)
  # The carry's dtype, not argmax's default: with jax_enable_x64 `jnp.argmax`
  # and the block index are int64 and `lax.scan` refuses a carry that changes.
  column = (first_column + block_argmax).astype(argmax.dtype)
  argmax = jnp.where(takes_over, column, argmax)
  return new_max, rest, argmax


def _finish_logsumexp(carry):
  """(max, log sum exp(z - max), argmax) from the running carry."""
  running_max, rest, argmax = carry
  return running_max, jnp.log1p(rest), argmax


def _log_probs(logits, normaliser):
  running_max, log_sum, _ = normaliser
  return (logits - running_max[:, None]) - log_sum[:, None]


def _is_argmax(normaliser, first_column, fresh):
  """`[tokens, vocab_chunk]` bool: the column of each token's argmax."""
  columns = first_column + jnp.arange(fresh.shape[0])
  return fresh & (columns == normaliser[2][:, None])


def _fused_loss(terms: Terms, tokens: _Blocks, vocabs: _Blocks,
                math_dtype) -> Callable[..., jax.Array]:
  """The custom-VJP loss on flat `[N, D]` hidden states (see module).

  Gradient w.r.t. the scaled student logits `u`, per token: `g - p_s G` with
  `g = dL/d(log p_s)` at fixed normaliser and `G = sum_c g_c`, written around
  the student's argmax column `a` as

  - `c != a`: `g_c - p_c (g_a + G_rest)`,
  - `c == a`: `g_a (1 - p_a) - p_a G_rest`, `G_rest = sum_{c != a} g_c`,

  with `1 - p_a = -expm1(-log sum)` from the forward normaliser. Where the
  softmax saturates (`p_a -> 1`) the plain form subtracts two large, separately
  rounded numbers: `g_a` recomputed in the backward pass and `G` summed in the
  forward pass (for reverse KL both are `~L + 1`, the token's loss, rounded
  at `|L| eps`); a logit recomputed one ulp differently moves them apart too.
  The anchored form multiplies `g_a` by the small `1 - p_a` instead and takes
  `G_rest` from terms that are all small, so no large cancellation is left.
  """

  def token_block(hidden, mask, k):
    """Token block `k` with masked and repeated rows set to 0, and its mask."""
    keep = tokens.fresh(k) & jax.lax.dynamic_slice_in_dim(
        mask, tokens.start(k), tokens.size)
    rows = tokens.read(hidden, k, axis=0)
    # Replaced, not multiplied: inf/NaN in masked rows must not reach the math.
    return jnp.where(keep[:, None], rows, 0), keep

  def logits(hidden, block, fresh, temperature):
    z = jnp.dot(hidden, block, preferred_element_type=math_dtype)
    return jnp.where(fresh, z / temperature, -jnp.inf)

  def grad_terms(log_ps, log_pt, params):
    """The block's value and `g = d value / d log p_s` (`[tokens, vocab]`)."""
    value, vjp = jax.vjp(lambda lp: terms(lp, log_pt, params), log_ps)
    g, = vjp(jnp.ones(value.shape, value.dtype))
    return value, g

  def forward(s_h, s_w, t_h, t_w, mask, params, with_grad):
    """Per token block: value, normalisers and, with_grad, `(g_a, G_rest)`."""
    temperature = params["temperature"]

    def token_chunk(k):
      hs, keep = token_block(s_h, mask, k)
      ht, _ = token_block(t_h, mask, k)

      def block_logits(v):
        fresh = vocabs.fresh(v)
        return (logits(hs, vocabs.read(s_w, v, axis=1), fresh, temperature),
                logits(ht, vocabs.read(t_w, v, axis=1), fresh, temperature),
                fresh)

      def normalisers(carry, v):
        zs, zt, _ = block_logits(v)
        first = vocabs.start(v)
        return (_online_logsumexp(carry[0], zs, first),
                _online_logsumexp(carry[1], zt, first)), None

      def add_block(carry, zs, zt, fresh, first, norm_s, norm_t):
        log_ps, log_pt = _log_probs(zs, norm_s), _log_probs(zt, norm_t)
        if not with_grad:
          return (carry[0] + terms(log_ps, log_pt, params),) + carry[1:]
        value, g = grad_terms(log_ps, log_pt, params)
        at_argmax = _is_argmax(norm_s, first, fresh)
        return (carry[0] + value,
                carry[1] + jnp.sum(jnp.where(at_argmax, g, 0.0), axis=-1),
                carry[2] + jnp.sum(jnp.where(at_argmax, 0.0, g), axis=-1))

      start = (jnp.full((tokens.size,), -jnp.inf, math_dtype),
               jnp.zeros((tokens.size,), math_dtype),
               jnp.zeros((tokens.size,), jnp.int32))
      zeros = jnp.zeros((tokens.size,), math_dtype)
      if vocabs.count == 1:
        # The whole vocabulary in one block (vocab_chunk_size >= V): the
        # normalisers and the value come from the same logits, computed once
        # instead of once per pass (Liger's layout: token chunks only).
        zs, zt, fresh = block_logits(0)
        norm_s = _finish_logsumexp(_online_logsumexp(start, zs, 0))
        norm_t = _finish_logsumexp(_online_logsumexp(start, zt, 0))
        value, g_argmax, g_rest = add_block((zeros, zeros, zeros), zs, zt,
                                            fresh, 0, norm_s, norm_t)
        return jnp.where(keep, value, 0.0), norm_s, norm_t, g_argmax, g_rest

      (norm_s, norm_t), _ = jax.lax.scan(normalisers, (start, start),
                                         jnp.arange(vocabs.count))
      norm_s, norm_t = _finish_logsumexp(norm_s), _finish_logsumexp(norm_t)

      def partial_sums(carry, v):
        zs, zt, fresh = block_logits(v)
        return add_block(carry, zs, zt, fresh, vocabs.start(v), norm_s,
                         norm_t), None

      (value, g_argmax, g_rest), _ = jax.lax.scan(
          partial_sums, (zeros, zeros, zeros), jnp.arange(vocabs.count))
      return jnp.where(keep, value, 0.0), norm_s, norm_t, g_argmax, g_rest

    return jax.lax.map(token_chunk, jnp.arange(tokens.count))

  @jax.custom_vjp
  def run(s_h, s_w, t_h, t_w, mask, params):
    return tokens.unblock(forward(s_h, s_w, t_h, t_w, mask, params, False)[0])

  def run_fwd(s_h, s_w, t_h, t_w, mask, params):
    value, *statistics = forward(s_h, s_w, t_h, t_w, mask, params, True)
    return tokens.unblock(value), (s_h, s_w, t_h, t_w, mask, params,
                                   statistics)

  def run_bwd(residuals, cotangent):
    s_h, s_w, t_h, t_w, mask, params, statistics = residuals
    temperature = params["temperature"]
    # dL/dz = dL/du / T, z the student logits.
    scale = cotangent.astype(math_dtype) / temperature

    def vocab_step(v, carry):
      d_hidden, d_unembed = carry
      fresh, first = vocabs.fresh(v), vocabs.start(v)
      s_block = vocabs.read(s_w, v, axis=1)
      t_block = vocabs.read(t_w, v, axis=1)

      def token_step(carry, xs):
        d_block, d_hidden = carry
        k, norm_s, norm_t, g_argmax, g_rest = xs
        hs, keep = token_block(s_h, mask, k)
        ht, _ = token_block(t_h, mask, k)
        log_ps = _log_probs(logits(hs, s_block, fresh, temperature), norm_s)
        log_pt = _log_probs(logits(ht, t_block, fresh, temperature), norm_t)
        _, g = grad_terms(log_ps, log_pt, params)
        p_s = jnp.exp(log_ps)
        # 1 - p_s at the argmax, rest / (1 + rest), from the normaliser.
        rest = -jnp.expm1(-norm_s[1])
        d_logits = jnp.where(
            _is_argmax(norm_s, first, fresh),
            g * rest[:, None] - p_s * g_rest[:, None],
            g - p_s * (g_argmax + g_rest)[:, None])
        token_scale = jnp.where(keep, jax.lax.dynamic_slice_in_dim(
            scale, tokens.start(k), tokens.size), 0.0)
        d_logits = jnp.where(fresh, d_logits, 0.0) * token_scale[:, None]
        d_hs = jnp.dot(d_logits, s_block.T, preferred_element_type=math_dtype)
        d_block = d_block + jnp.dot(hs.T, d_logits,
                                    preferred_element_type=math_dtype)
        rows = jax.lax.dynamic_slice_in_dim(d_hidden, tokens.start(k),
                                            tokens.size)
        d_hidden = jax.lax.dynamic_update_slice_in_dim(
            d_hidden, rows + d_hs, tokens.start(k), axis=0)
        return (d_block, d_hidden), None

      (d_block, d_hidden), _ = jax.lax.scan(
          token_step,
          (jnp.zeros((s_w.shape[0], vocabs.size), math_dtype), d_hidden),
          (jnp.arange(tokens.count), *statistics))
      # The shifted last block keeps the columns the previous one wrote.
      previous = jax.lax.dynamic_slice_in_dim(d_unembed, first, vocabs.size,
                                              axis=1)
      d_block = jnp.where(fresh, _to_transport(d_block.astype(s_w.dtype)),
                          previous)
      d_unembed = jax.lax.dynamic_update_slice_in_dim(d_unembed, d_block,
                                                      first, axis=1)
      return d_hidden, d_unembed

    # The unembedding gradient is one buffer updated in place, block by block,
    # in its own dtype (as uint16 bits for 16-bit floats: see `_Blocks.read`).
    d_hidden, d_unembed = jax.lax.fori_loop(
        0, vocabs.count, vocab_step,
        (jnp.zeros(s_h.shape, math_dtype),
         _to_transport(jnp.zeros(s_w.shape, s_w.dtype))))
    return (d_hidden.astype(s_h.dtype), _from_transport(d_unembed, s_w.dtype),
            None, None, None, jax.tree.map(jnp.zeros_like, params))

  run.defvjp(run_fwd, run_bwd)
  return run


def _fused(name: str, terms: Terms, student_hidden, student_unembedding,
           teacher_hidden, teacher_unembedding, *, temperature, where,
           vocab_chunk_size, token_chunk_size,
           hyper: Dict[str, Any]) -> jax.Array:
  """Validates the inputs, flattens the tokens and runs `_fused_loss`."""
  s_hidden, s_unembed = _check_pair(name, "student", student_hidden,
                                    student_unembedding)
  t_hidden, t_unembed = _check_pair(name, "teacher", teacher_hidden,
                                    teacher_unembedding)
  lead_shape = tuple(s_hidden.shape[:-1])
  if tuple(t_hidden.shape[:-1]) != lead_shape:
    raise ValueError(
        f"{name}: student_hidden shape {tuple(s_hidden.shape)} and "
        f"teacher_hidden shape {tuple(t_hidden.shape)} must agree on every "
        f"axis but the last (the tokens)")
  vocab = s_unembed.shape[1]
  if t_unembed.shape[1] != vocab:
    raise ValueError(
        f"{name}: vocabulary sizes differ: student_unembedding shape "
        f"{tuple(s_unembed.shape)} (V={vocab}), teacher_unembedding shape "
        f"{tuple(t_unembed.shape)} (V={t_unembed.shape[1]})")
  if vocab < 1:
    raise ValueError(f"{name}: the vocabulary is empty (V=0)")
  _checks.check_positive(name, "temperature", temperature)
  vocab_chunk = min(_check_chunk(name, "vocab_chunk_size", vocab_chunk_size),
                    vocab)
  token_chunk_size = _check_chunk(name, "token_chunk_size", token_chunk_size)
  mask = _checks.check_where(name, where, lead_shape)

  math_dtype = functools.reduce(
      jnp.promote_types, [a.dtype for a in (s_hidden, s_unembed, t_hidden,
                                            t_unembed)], jnp.dtype(jnp.float32))
  num_tokens = math.prod(lead_shape)
  if num_tokens == 0:
    return jnp.zeros(lead_shape, math_dtype)
  mask = (jnp.ones((num_tokens,), bool) if mask is None
          else mask.reshape(num_tokens))
  params = {k: jnp.asarray(v, math_dtype) for k, v in hyper.items()}
  params["temperature"] = jnp.asarray(temperature, math_dtype)
  loss = _fused_loss(terms, _Blocks(num_tokens,
                                    min(token_chunk_size, num_tokens)),
                     _Blocks(vocab, vocab_chunk), math_dtype)
  value = loss(s_hidden.reshape(num_tokens, s_hidden.shape[-1]), s_unembed,
               t_hidden.reshape(num_tokens, t_hidden.shape[-1]), t_unembed,
               mask, params)
  return value.reshape(lead_shape)

# ----------------------------------------------------------------------------
# Elementwise terms of each divergence (sums over one vocabulary block).
# ----------------------------------------------------------------------------


def _forward_kl_terms(log_ps, log_pt, params):
  del params
  return logit._kl_from_log(log_pt, log_ps)  # pylint: disable=protected-access


def _reverse_kl_terms(log_ps, log_pt, params):
  del params
  return logit._kl_from_log(log_ps, log_pt)  # pylint: disable=protected-access


def _kd_terms(log_ps, log_pt, params):
  return params["temperature"]**2 * _forward_kl_terms(log_ps, log_pt, params)


def _mixed_jsd_terms(log_ps, log_pt, params):
  beta = params["beta"]
  log_m = logit._log_mixture(log_pt, log_ps, beta)  # pylint: disable=protected-access
  return (beta * logit._kl_from_log(log_pt, log_m)  # pylint: disable=protected-access
          + (1 - beta) * logit._kl_from_log(log_ps, log_m))  # pylint: disable=protected-access


def _traced_jsd_terms(log_ps, log_pt, params):
  beta = params["beta"]
  return jnp.where(beta == 0, _forward_kl_terms(log_ps, log_pt, params),
                   jnp.where(beta == 1,
                             _reverse_kl_terms(log_ps, log_pt, params),
                             _mixed_jsd_terms(log_ps, log_pt, params)))


def _skew_forward_kl_terms(log_ps, log_pt, params):
  log_mix = logit._log_mixture(log_pt, log_ps, params["alpha"])  # pylint: disable=protected-access
  return logit._kl_from_log(log_pt, log_mix)  # pylint: disable=protected-access


def _skew_reverse_kl_terms(log_ps, log_pt, params):
  log_mix = logit._log_mixture(log_ps, log_pt, params["alpha"])  # pylint: disable=protected-access
  return logit._kl_from_log(log_ps, log_mix)  # pylint: disable=protected-access


def _total_variation_terms(log_ps, log_pt, params):
  del params
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps)), axis=-1)


# ----------------------------------------------------------------------------
# Public losses.
# ----------------------------------------------------------------------------

_ARGS_DOC = """
  Args:
    student_hidden: `[..., D_s]` student final hidden states (e.g. `[B, T, D_s]`).
    student_unembedding: `[D_s, V]` student unembedding (logits are
      `student_hidden @ student_unembedding`).
    teacher_hidden: `[..., D_t]` teacher hidden states, same leading shape.
    teacher_unembedding: `[D_t, V]` teacher unembedding, same `V`.
    temperature: softmax temperature `T > 0`.
    where: optional `[...]` mask; masked tokens are 0 and get no gradient.
    vocab_chunk_size: vocabulary entries per block (need not divide `V`); at
      least `V` makes one block and a one-pass forward (faster, more memory).
    token_chunk_size: tokens per block.
"""


def fused_kd(student_hidden: ArrayLike, student_unembedding: ArrayLike,
             teacher_hidden: ArrayLike, teacher_unembedding: ArrayLike, *,
             temperature: Numeric = 4.0, where: Optional[ArrayLike] = None,
             vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
             token_chunk_size: int = DEFAULT_TOKEN_CHUNK) -> jax.Array:
  """`kd` (`T**2 KL(p_t || p_s)`) from hidden states, vocabulary-chunked.

  See the module docstring for the algorithm; the gradient w.r.t. the student
  logits is `T (p_s - p_t)`.
  {args}
  Returns:
    `[...]` per-token loss, equal to `kd(student_hidden @ student_unembedding,
    teacher_hidden @ teacher_unembedding, ...)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_kd(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.kd(hs @ ws, ht @ wt), rtol=1e-5))
    True

  Reference:
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
  """
  return _fused("fused_kd", _kd_terms, student_hidden, student_unembedding,
                teacher_hidden, teacher_unembedding, temperature=temperature,
                where=where, vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={})


def fused_forward_kl(student_hidden: ArrayLike, student_unembedding: ArrayLike,
                     teacher_hidden: ArrayLike, teacher_unembedding: ArrayLike,
                     *, temperature: Numeric = 1.0,
                     where: Optional[ArrayLike] = None,
                     vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                     token_chunk_size: int = DEFAULT_TOKEN_CHUNK) -> jax.Array:
  """`forward_kl` (`KL(p_t || p_s)`) from hidden states, vocabulary-chunked.

  Gradient w.r.t. the student logits: `(p_s - p_t) / T`.
  {args}
  Returns:
    `[...]` per-token loss, equal to `forward_kl` on the materialised logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_forward_kl(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.forward_kl(hs @ ws, ht @ wt), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD), ICLR
    2024.
  """
  return _fused("fused_forward_kl", _forward_kl_terms, student_hidden,
                student_unembedding, teacher_hidden, teacher_unembedding,
                temperature=temperature, where=where,
                vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={})


def fused_reverse_kl(student_hidden: ArrayLike, student_unembedding: ArrayLike,
                     teacher_hidden: ArrayLike, teacher_unembedding: ArrayLike,
                     *, temperature: Numeric = 1.0,
                     where: Optional[ArrayLike] = None,
                     vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                     token_chunk_size: int = DEFAULT_TOKEN_CHUNK) -> jax.Array:
  """`reverse_kl` (`KL(p_s || p_t)`) from hidden states, vocabulary-chunked.

  Gradient w.r.t. the student logits: `p_s (log p_s - log p_t - L) / T`, with
  `L` the token's loss. It stays accurate where the student's softmax
  saturates (the argmax-anchored form of `_fused_loss`): with logits ~3e3 and
  a runner-up at `p ~ 4e-7`, its hidden-state gradient is within 1e-5
  (relative) of float64, where `reverse_kl` on materialised float32 logits is
  3e-2 off.
  {args}
  Returns:
    `[...]` per-token loss, equal to `reverse_kl` on the materialised logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_reverse_kl(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.reverse_kl(hs @ ws, ht @ wt), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
    ICLR 2024.
  """
  return _fused("fused_reverse_kl", _reverse_kl_terms, student_hidden,
                student_unembedding, teacher_hidden, teacher_unembedding,
                temperature=temperature, where=where,
                vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={})


def fused_generalized_jsd(student_hidden: ArrayLike,
                          student_unembedding: ArrayLike,
                          teacher_hidden: ArrayLike,
                          teacher_unembedding: ArrayLike, *,
                          beta: Numeric = 0.5, temperature: Numeric = 1.0,
                          where: Optional[ArrayLike] = None,
                          vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                          token_chunk_size: int = DEFAULT_TOKEN_CHUNK
                          ) -> jax.Array:
  """`generalized_jsd` (GKD / TRL convention) from hidden states, chunked.

  `m = beta p_t + (1 - beta) p_s`; `beta KL(p_t || m) + (1 - beta) KL(p_s ||
  m)`, with `beta=0` giving `forward_kl` and `beta=1` `reverse_kl` exactly as
  `generalized_jsd` does. Gradient w.r.t. the student logits:
  `(1 - beta) p_s (log p_s - log m - KL(p_s || m)) / T`. The JAX counterpart
  of Liger-Kernel's fused linear JSD.
  {args}    beta: interpolation weight in `[0, 1]`.

  Returns:
    `[...]` per-token loss, equal to `generalized_jsd` on the logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_generalized_jsd(hs, ws, ht, wt, vocab_chunk_size=4, beta=0.3)
    >>> bool(jnp.allclose(got, losses.generalized_jsd(hs @ ws, ht @ wt, beta=0.3), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR 2024.
  """
  name = "fused_generalized_jsd"
  _checks.check_interval(name, "beta", beta, 0.0, 1.0)
  if _checks.is_python_number(beta):
    terms = {0: _forward_kl_terms, 1: _reverse_kl_terms}.get(beta,
                                                             _mixed_jsd_terms)
  else:
    terms = _traced_jsd_terms
  return _fused(name, terms, student_hidden, student_unembedding,
                teacher_hidden, teacher_unembedding, temperature=temperature,
                where=where, vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={"beta": beta})


def fused_skew_forward_kl(student_hidden: ArrayLike,
                          student_unembedding: ArrayLike,
                          teacher_hidden: ArrayLike,
                          teacher_unembedding: ArrayLike, *,
                          alpha: Numeric = 0.1, temperature: Numeric = 1.0,
                          where: Optional[ArrayLike] = None,
                          vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                          token_chunk_size: int = DEFAULT_TOKEN_CHUNK
                          ) -> jax.Array:
  """`skew_forward_kl` (`KL(p_t || alpha p_t + (1 - alpha) p_s)`), chunked.

  Gradient w.r.t. the student logits, with `mix = alpha p_t + (1 - alpha) p_s`
  and `S = sum_c p_t^2 / mix`: `(p_s - p_t + alpha (p_t^2 / mix - p_s S)) / T`.
  {args}    alpha: skew in `[0, 1)`.

  Returns:
    `[...]` per-token loss, equal to `skew_forward_kl` on the logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_skew_forward_kl(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.skew_forward_kl(hs @ ws, ht @ wt), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024.
  """
  name = "fused_skew_forward_kl"
  _checks.check_interval(name, "alpha", alpha, 0.0, 1.0, high_inclusive=False)
  return _fused(name, _skew_forward_kl_terms, student_hidden,
                student_unembedding, teacher_hidden, teacher_unembedding,
                temperature=temperature, where=where,
                vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={"alpha": alpha})


def fused_skew_reverse_kl(student_hidden: ArrayLike,
                          student_unembedding: ArrayLike,
                          teacher_hidden: ArrayLike,
                          teacher_unembedding: ArrayLike, *,
                          alpha: Numeric = 0.1, temperature: Numeric = 1.0,
                          where: Optional[ArrayLike] = None,
                          vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                          token_chunk_size: int = DEFAULT_TOKEN_CHUNK
                          ) -> jax.Array:
  """`skew_reverse_kl` (`KL(p_s || alpha p_s + (1 - alpha) p_t)`), chunked.

  Gradient w.r.t. the student logits, with `mix = alpha p_s + (1 - alpha) p_t`
  and `S = sum_c p_s^2 / mix`:
  `p_s (log p_s - log mix - alpha p_s / mix - L + alpha S) / T`.
  {args}    alpha: skew in `[0, 1)`.

  Returns:
    `[...]` per-token loss, equal to `skew_reverse_kl` on the logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_skew_reverse_kl(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.skew_reverse_kl(hs @ ws, ht @ wt), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024.
  """
  name = "fused_skew_reverse_kl"
  _checks.check_interval(name, "alpha", alpha, 0.0, 1.0, high_inclusive=False)
  return _fused(name, _skew_reverse_kl_terms, student_hidden,
                student_unembedding, teacher_hidden, teacher_unembedding,
                temperature=temperature, where=where,
                vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={"alpha": alpha})


def fused_total_variation(student_hidden: ArrayLike,
                          student_unembedding: ArrayLike,
                          teacher_hidden: ArrayLike,
                          teacher_unembedding: ArrayLike, *,
                          temperature: Numeric = 1.0,
                          where: Optional[ArrayLike] = None,
                          vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
                          token_chunk_size: int = DEFAULT_TOKEN_CHUNK
                          ) -> jax.Array:
  """`total_variation` (`0.5 sum |p_t - p_s|`) from hidden states, chunked.

  Gradient w.r.t. the student logits, with `s_c = sign(p_s,c - p_t,c)`:
  `0.5 p_s (s - sum_c p_s,c s_c) / T`.
  {args}
  Returns:
    `[...]` per-token loss, equal to `total_variation` on the logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import losses
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (4, 10))
    >>> ht, wt = jax.random.normal(k[2], (2, 3, 5)), jax.random.normal(k[3], (5, 10))
    >>> got = losses.fused_total_variation(hs, ws, ht, wt, vocab_chunk_size=4)
    >>> bool(jnp.allclose(got, losses.total_variation(hs @ ws, ht @ wt), rtol=1e-5, atol=1e-6))
    True

  Reference:
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation", ACL 2023.
  """
  return _fused("fused_total_variation", _total_variation_terms,
                student_hidden, student_unembedding, teacher_hidden,
                teacher_unembedding, temperature=temperature, where=where,
                vocab_chunk_size=vocab_chunk_size,
                token_chunk_size=token_chunk_size, hyper={})


for _fn in (fused_kd, fused_forward_kl, fused_reverse_kl, fused_generalized_jsd,
            fused_skew_forward_kl, fused_skew_reverse_kl,
            fused_total_variation):
  _fn.__doc__ = _fn.__doc__.replace("{args}", _ARGS_DOC.strip("\n") + "\n")
del _fn
