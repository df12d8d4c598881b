"""Fused, vocabulary-chunked LM distillation losses from hidden states.

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

1. normalisers: an online log-sum-exp over vocabulary blocks,
   `A <- logaddexp(A, logsumexp(block))`, for student and teacher;
2. value: every divergence here is a sum over classes of elementwise terms of
   `(log p_s, log p_t)` once the normalisers are known (the JSD / skew-KL
   mixtures `beta p_t + (1 - beta) p_s` are already normalised, so they need no
   third normaliser), so the per-token value is the sum of per-block partial
   sums. The same pass takes a forward-mode derivative of those partial sums
   along `log p_s -> log p_s + 1` to get `G = sum_c dL/d(log p_s,c)`.
3. gradient (custom VJP): by the chain rule through `log p_s = u - A_s(u)`,

   .. math::
     \\frac{\\partial L}{\\partial u_j} = g_j - p_{s,j}\\, G,\\qquad
     g_j = \\frac{\\partial L}{\\partial \\log p_{s,j}}\\Big|_{A_s\\ \\mathrm{fixed}},
     \\quad G = \\sum_c g_c,

   where `g` is the `jax.vjp` of the block's elementwise terms (the normaliser
   held constant) and `-p_s G` is the normaliser's own contribution. For
   reference, the closed forms this produces are: forward KL `p_s - p_t`;
   reverse KL `p_s (log p_s - log p_t - L)`; JSD
   `(1 - beta) p_s (log p_s - log m - KL(p_s || m))`; skew forward KL
   `p_s - p_t + alpha (p_t^2 / mix - p_s S)` with `S = sum p_t^2 / mix`; all
   times `1/T` (and `T**2` for `kd`). The backward pass loops over vocabulary
   blocks outside and token blocks inside, so each block of the unembedding
   gradient `[D_s, vocab_chunk]` is finished (float32 accumulation) and written
   once in the unembedding's dtype; the hidden-state gradient is accumulated in
   float32 `[N, D_s]`.

Teacher inputs get no gradient (their cotangents are zero by construction, as
if under `stop_gradient`); a teacher is frozen in distillation. Masked tokens
are exactly 0 with exactly zero gradient, even if their hidden states hold
`inf`/`NaN` (rows are replaced by 0 before any arithmetic). Inputs may be
bfloat16; all arithmetic is float32 (float64 stays float64). Being a custom
VJP, the functions support first-order reverse-mode differentiation.

Memory: besides the inputs and the gradients, the loop holds a few
`[token_chunk, vocab_chunk]` float32 blocks, `[N]` normalisers and the float32
`[N, D_s]` hidden-state gradient; see `experiments/fused_loss_benchmark.py`.
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
# The fused engine.
# ----------------------------------------------------------------------------


def _online_logsumexp(carry, block):
  """One step of a streaming log-sum-exp: (running max, sum exp(z - max)).

  The max and the log of the sum stay separate (rather than one running
  `logaddexp`) so that `log p = (z - max) - log(sum)` loses no precision when
  logits are large: `z - max` is exact for close floats, while `z - lse` would
  carry lse's rounding error (~1e-4 at |z| ~ 1e3), which breaks the
  cancellation `g - p G` of saturated softmaxes.
  """
  running_max, running_sum = carry
  new_max = jnp.maximum(running_max, jnp.max(block, axis=-1))
  rescale = jnp.where(jnp.isneginf(running_max), 0.0,
                      jnp.exp(running_max - new_max))
  total = running_sum * rescale + jnp.sum(
      jnp.exp(block - new_max[:, None]), axis=-1)
  return new_max, total


def _finish_logsumexp(carry):
  running_max, running_sum = carry
  return running_max, jnp.log(running_sum)


def _log_probs(logits, normaliser):
  running_max, log_sum = normaliser
  return (logits - running_max[:, None]) - log_sum[:, None]


def _fused(name: str, terms: Terms, student_hidden, student_unembedding,
           teacher_hidden, teacher_unembedding, *, temperature, where,
           vocab_chunk_size, token_chunk_size,
           hyper: Dict[str, Any]) -> jax.Array:
  """Validates, flattens, pads and runs `terms` block by block (see module)."""
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
  token_chunk = min(token_chunk_size, num_tokens)
  num_token_chunks = -(-num_tokens // token_chunk)
  num_vocab_chunks = -(-vocab // vocab_chunk)
  padding = num_token_chunks * token_chunk - num_tokens

  mask = (jnp.ones((num_tokens,), bool) if mask is None
          else mask.reshape(num_tokens))

  def blocks(hidden):
    hidden = hidden.reshape(num_tokens, hidden.shape[-1])
    # Replaced, not multiplied: inf/NaN in masked rows must not reach the math.
    hidden = jnp.where(mask[:, None], hidden, 0)
    hidden = jnp.pad(hidden, [(0, padding), (0, 0)])
    return hidden.reshape(num_token_chunks, token_chunk, hidden.shape[-1])

  token_mask = jnp.pad(mask, [(0, padding)]).reshape(num_token_chunks,
                                                     token_chunk)
  params = {k: jnp.asarray(v, math_dtype) for k, v in hyper.items()}
  params["temperature"] = jnp.asarray(temperature, math_dtype)

  def vocab_block(unembed_transport, dtype, i):
    """Vocabulary block i as `[D, vocab_chunk]` math_dtype, and its new columns.

    The last block is shifted left to end at V (no padded copy of the
    unembedding); its columns that the previous block already covered are
    reported invalid and contribute nothing.
    """
    start = jnp.minimum(i * vocab_chunk, vocab - vocab_chunk)
    block = jax.lax.dynamic_slice_in_dim(unembed_transport, start, vocab_chunk,
                                         axis=1)
    valid = start + jnp.arange(vocab_chunk) >= i * vocab_chunk
    return _from_transport(block, dtype).astype(math_dtype), valid, start

  def block_logits(hidden, block, valid, temperature):
    logits = jnp.dot(hidden, block, preferred_element_type=math_dtype)
    return jnp.where(valid, logits / temperature, -jnp.inf)

  def forward(s_h, s_w, t_h, t_w, token_mask, params, with_grad_sum):
    """Per token chunk: value, normalisers and (optionally) G, each `[N]`."""
    temperature = params["temperature"]
    s_w_transport, t_w_transport = _to_transport(s_w), _to_transport(t_w)

    def logits_pair(hs, ht, i):
      s_block, valid, _ = vocab_block(s_w_transport, s_w.dtype, i)
      t_block, _, _ = vocab_block(t_w_transport, t_w.dtype, i)
      return (block_logits(hs, s_block, valid, temperature),
              block_logits(ht, t_block, valid, temperature))

    def chunk(xs):
      hs, ht, chunk_mask = xs
      hs = _from_transport(hs, s_h.dtype).astype(math_dtype)
      ht = _from_transport(ht, t_h.dtype).astype(math_dtype)

      def normalisers(carry, i):
        zs, zt = logits_pair(hs, ht, i)
        return (_online_logsumexp(carry[0], zs),
                _online_logsumexp(carry[1], zt)), None

      start = (jnp.full((token_chunk,), -jnp.inf, math_dtype),
               jnp.zeros((token_chunk,), math_dtype))
      (norm_s, norm_t), _ = jax.lax.scan(normalisers, (start, start),
                                         jnp.arange(num_vocab_chunks))
      norm_s, norm_t = _finish_logsumexp(norm_s), _finish_logsumexp(norm_t)

      def partial_sums(carry, i):
        zs, zt = logits_pair(hs, ht, i)
        log_ps, log_pt = _log_probs(zs, norm_s), _log_probs(zt, norm_t)
        if with_grad_sum:
          # Forward mode along log p_s -> log p_s + 1: the tangent is sum_c g_c.
          value, grad_sum = jax.jvp(lambda lp: terms(lp, log_pt, params),
                                    (log_ps,), (jnp.ones_like(log_ps),))
        else:
          value, grad_sum = terms(log_ps, log_pt, params), 0.0
        return (carry[0] + value, carry[1] + grad_sum), None

      zeros = jnp.zeros((token_chunk,), math_dtype)
      (value, grad_sum), _ = jax.lax.scan(partial_sums, (zeros, zeros),
                                          jnp.arange(num_vocab_chunks))
      value = jnp.where(chunk_mask, value, 0.0)
      return value, norm_s, norm_t, grad_sum

    return jax.lax.map(chunk, (_to_transport(s_h), _to_transport(t_h),
                               token_mask))

  @jax.custom_vjp
  def run(s_h, s_w, t_h, t_w, token_mask, params):
    return forward(s_h, s_w, t_h, t_w, token_mask, params, False)[0]

  def run_fwd(s_h, s_w, t_h, t_w, token_mask, params):
    value, norm_s, norm_t, grad_sum = forward(s_h, s_w, t_h, t_w, token_mask,
                                              params, True)
    return value, (s_h, s_w, t_h, t_w, token_mask, params, norm_s, norm_t,
                   grad_sum)

  def run_bwd(residuals, cotangent):
    s_h, s_w, t_h, t_w, token_mask, params, norm_s, norm_t, grad_sum = residuals
    temperature = params["temperature"]
    # dL/dz = dL/du / T, and the per-token cotangent; masked tokens get 0.
    scale = jnp.where(token_mask, cotangent, 0.0).astype(math_dtype)
    scale = scale / temperature
    s_w_transport, t_w_transport = _to_transport(s_w), _to_transport(t_w)
    s_h_transport, t_h_transport = _to_transport(s_h), _to_transport(t_h)
    student_dim = s_h.shape[-1]

    def vocab_step(i, carry):
      d_hidden, d_unembed = carry
      s_block, valid, start = vocab_block(s_w_transport, s_w.dtype, i)
      t_block, _, _ = vocab_block(t_w_transport, t_w.dtype, i)

      def token_step(d_block, xs):
        hs, ht, ls, lt, g_sum, sc = xs
        hs = _from_transport(hs, s_h.dtype).astype(math_dtype)
        ht = _from_transport(ht, t_h.dtype).astype(math_dtype)
        log_ps = _log_probs(block_logits(hs, s_block, valid, temperature), ls)
        log_pt = _log_probs(block_logits(ht, t_block, valid, temperature), lt)
        _, vjp = jax.vjp(lambda lp: terms(lp, log_pt, params), log_ps)
        g, = vjp(jnp.ones((token_chunk,), math_dtype))
        d_logits = (g - jnp.exp(log_ps) * g_sum[:, None]) * sc[:, None]
        d_logits = jnp.where(valid, d_logits, 0.0)
        d_hs = jnp.dot(d_logits, s_block.T, preferred_element_type=math_dtype)
        d_block = d_block + jnp.dot(hs.T, d_logits,
                                    preferred_element_type=math_dtype)
        return d_block, d_hs

      d_block, d_hs = jax.lax.scan(
          token_step, jnp.zeros((student_dim, vocab_chunk), math_dtype),
          (s_h_transport, t_h_transport, norm_s, norm_t, grad_sum, scale))
      previous = _from_transport(
          jax.lax.dynamic_slice_in_dim(d_unembed, start, vocab_chunk, axis=1),
          s_w.dtype)
      d_block = jnp.where(valid, d_block.astype(s_w.dtype), previous)
      d_unembed = jax.lax.dynamic_update_slice_in_dim(
          d_unembed, _to_transport(d_block), start, axis=1)
      return d_hidden + d_hs, d_unembed

    d_hidden, d_unembed = jax.lax.fori_loop(
        0, num_vocab_chunks, vocab_step,
        (jnp.zeros(s_h.shape, math_dtype),
         _to_transport(jnp.zeros(s_w.shape, s_w.dtype))))
    return (d_hidden.astype(s_h.dtype), _from_transport(d_unembed, s_w.dtype),
            None, None, None, jax.tree.map(jnp.zeros_like, params))

  run.defvjp(run_fwd, run_bwd)
  value = run(blocks(s_hidden), s_unembed, blocks(t_hidden), t_unembed,
              token_mask, params)
  return value.reshape(-1)[:num_tokens].reshape(lead_shape)


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
    vocab_chunk_size: vocabulary entries per block (need not divide `V`).
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
  `L` the token's loss.
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
