"""A decoder-only Transformer language model (LLaMA-style), with a functional KV cache.

The architecture of LLaMA (Touvron et al. 2023) at small scale: a token embedding, `num_layers`
pre-norm blocks `x + attention(rms_norm(x))`, `x + swiglu(rms_norm(x))`, a final RMSNorm
(Zhang & Sennrich 2019) and an unembedding tied to the token embedding (default) or separate.
Attention is causal multi-head self-attention with rotary position embeddings (RoPE, Su et al.
2021, the "rotate half" layout of GPT-NeoX / LLaMA) and no biases anywhere; the MLP is SwiGLU
(Shazeer 2020): `down(silu(gate(x)) * up(x))`. No dropout. Parameters are float32; `dtype`
sets the compute dtype (attention scores, softmax and the returned logits stay float32).

Registry entries (`num_classes` is the vocabulary size; the defaults are for byte-level text,
256 bytes plus 3 special tokens = 259), all with `max_length` 512:

| name         | layers | D   | heads | MLP | parameters (V = 259, tied) |
| ------------ | ------ | --- | ----- | --- | -------------------------- |
| `lm_tiny`    | 2      | 32  | 2     | 64  | 28,928                     |
| `lm_student` | 4      | 128 | 4     | 192 | 591,360                    |
| `lm_teacher` | 6      | 256 | 8     | 512 | 4,001,792                  |

With `D` the width, `M` the MLP width, `L` the layers and `V` the vocabulary the count is
`V D + L (4 D^2 + 3 D M + 2 D) + D`, plus `D V` when untied (`parameter_count`).

Inputs `tokens [B, T]` int32 with `T <= max_length`. Output `logits [B, T, V]` float32 and the
feature taps, with `i = 1..num_layers`, `H` heads:
  'hidden'       [B, T, D]     the final RMSNorm's output: the unembedding's input, so that
                               `hidden @ unembedding_matrix(params)` are the logits (fused,
                               vocabulary-chunked losses compute logits from it block by block);
  'embedding'    [B, T, D]     the same array as 'hidden' (the kdjax pre-logit contract);
  'unembedding'  [D, V]        `unembedding_matrix(params)` itself (not a per-token tap), so that
                               the LM methods' fused mode (`kdjax.methods.lm_fused`) works for
                               the `lm_*` students and teachers;
  'block{i}'     [B, T, D]     the residual stream after block i;
  'attention{i}' [B, H, T, T]  block i's causal attention probabilities (float32, rows sum to 1).

KV-cache decoding (`init_cache`, `TransformerLM.decode`): the cache holds per layer the rotated
keys and the values `[B, H, L, D / H]` of every position written so far and the number of
positions written (`index`, shared by the batch). `decode(tokens [B, T], cache)` runs T new
positions starting at `index` (a prompt prefill, or one token per step) and returns their
logits, equal to the full forward's at the same positions, and the cache with `index + T`:

    module = get_model("lm_tiny", num_classes=259)
    cache = module.init_cache(batch_size, max_length=P + N)
    logits, cache = module.apply(variables, prompts, cache, method="decode")   # prefill
    logits, cache = module.apply(variables, next_tokens, cache, method="decode")  # [B, 1]
"""

import math
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

_NORM_EPS = 1e-6  # LLaMA's rms_norm_eps.
# GPT-2 / LLaMA initialise every weight as N(0, 0.02^2); with a tied unembedding a unit-variance
# embedding (linen's default) would start with logits of standard deviation sqrt(D).
_init = nn.initializers.normal(stddev=0.02)


class KVCache(NamedTuple):
  """The decoding state of a `TransformerLM` (a pytree: pass it through jit and lax.scan).

  Attributes:
    keys: per layer [B, H, L, D / H] rotated keys of positions 0..index-1 (zeros after).
    values: per layer [B, H, L, D / H] values, likewise.
    index: int32 scalar, the number of positions written (the next token's position).
  """
  keys: Tuple[jax.Array, ...]
  values: Tuple[jax.Array, ...]
  index: jax.Array


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), GPT-NeoX / LLaMA "rotate half" layout.

  Args:
    x: [B, H, T, d] queries or keys, d even.
    positions: [T] integer absolute positions.
    base: the frequency base (10000 in RoFormer and LLaMA).

  Returns:
    [B, H, T, d]: pairs (x_j, x_{j + d/2}) rotated by angle position * base^(-2j/d).
  """
  half = x.shape[-1] // 2
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * frequencies[None, :]  # [T, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def causal_attention(query, key, value, query_positions, key_positions):
  """softmax(q k^T / sqrt(d)) v with key position <= query position.

  Args:
    query: [B, H, T, d]; key, value: [B, H, S, d].
    query_positions: [T]; key_positions: [S] absolute positions.

  Returns:
    (out [B, H, T, d] in value's dtype, probabilities [B, H, T, S] float32).
  """
  # Float32 scores whatever the compute dtype: the attention tap is a distribution that
  # distillation losses compare, and bf16 rows would not sum to 1.
  scores = jnp.einsum("bhqd,bhkd->bhqk", query.astype(jnp.float32),
                      key.astype(jnp.float32)) / math.sqrt(query.shape[-1])
  allowed = key_positions[None, :] <= query_positions[:, None]
  # The most negative finite float, not -inf: exp underflows to exactly 0 and no row is all -inf.
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probabilities = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bhkd->bhqd", probabilities.astype(value.dtype), value)
  return out, probabilities


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with RoPE, no biases.

  `__call__(x [B, T, D], positions [T], kv=None)` returns (out [B, T, D], probabilities
  [B, H, T, S], new kv). Without `kv` the keys are this call's own (S = T); with
  `kv = (keys, values, index)` of shape [B, H, L, d] this call's keys and values are written at
  `index` and the queries attend to all L slots (S = L; slots after the query are masked).
  """
  num_heads: int
  rope_base: float = 10000.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads

    def project(name):
      y = nn.Dense(dim, use_bias=False, kernel_init=_init, dtype=self.dtype, name=name)(x)
      return y.reshape(batch, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

    query = apply_rope(project("query"), positions, self.rope_base)
    key = apply_rope(project("key"), positions, self.rope_base)
    value = project("value")
    new_kv = None
    if kv is None:
      keys, values, key_positions = key, value, positions
    else:
      cached_keys, cached_values, index = kv
      start = (0, 0, index, 0)
      keys = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), start)
      values = jax.lax.dynamic_update_slice(cached_values, value.astype(cached_values.dtype),
                                            start)
      key_positions = jnp.arange(keys.shape[2])
      new_kv = (keys, values)
    out, probabilities = causal_attention(query, keys.astype(query.dtype),
                                          values.astype(query.dtype), positions, key_positions)
    out = out.transpose(0, 2, 1, 3).reshape(batch, length, dim)
    out = nn.Dense(dim, use_bias=False, kernel_init=_init, dtype=self.dtype, name="out")(out)
    return out, probabilities, new_kv


class Block(nn.Module):
  """Pre-norm block: x + attention(rms_norm(x)), then x + swiglu(rms_norm(x))."""
  num_heads: int
  mlp_dim: int
  rope_base: float = 10000.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    norm = lambda name: nn.RMSNorm(epsilon=_NORM_EPS, dtype=self.dtype, name=name)
    attended, probabilities, new_kv = CausalSelfAttention(
        self.num_heads, self.rope_base, self.dtype, name="attention")(
            norm("attention_norm")(x), positions, kv)
    x = x + attended
    h = norm("mlp_norm")(x)
    dense = lambda width, name: nn.Dense(width, use_bias=False, kernel_init=_init,
                                         dtype=self.dtype, name=name)
    gated = nn.silu(dense(self.mlp_dim, "gate")(h)) * dense(self.mlp_dim, "up")(h)
    return x + dense(x.shape[-1], "down")(gated), probabilities, new_kv


class TransformerLM(nn.Module):
  """Decoder-only Transformer LM; see the module docstring for the taps and the KV cache.

  Attributes:
    vocab_size: V, the number of token ids.
    num_layers, embed_dim, num_heads, mlp_dim: depth, width D, heads H, SwiGLU width.
    max_length: the longest sequence (and KV cache) allowed.
    tie_embeddings: the unembedding is the token embedding's transpose (else a separate
      `unembed` kernel [D, V]).
    rope_base: RoPE's frequency base.
    dtype: the compute dtype (parameters stay float32).
  """
  vocab_size: int = 259
  num_layers: int = 2
  embed_dim: int = 32
  num_heads: int = 2
  mlp_dim: int = 64
  max_length: int = 512
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: Any = jnp.float32

  def setup(self):
    if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
      raise ValueError(
          f"TransformerLM: embed_dim={self.embed_dim} must be num_heads={self.num_heads} times "
          "an even head width (RoPE rotates pairs of channels).")
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=_init,
                          dtype=self.dtype)
    self.blocks = [Block(self.num_heads, self.mlp_dim, self.rope_base, self.dtype)
                   for _ in range(self.num_layers)]
    self.final_norm = nn.RMSNorm(epsilon=_NORM_EPS, dtype=self.dtype)
    if not self.tie_embeddings:
      self.unembed = nn.Dense(self.vocab_size, use_bias=False, kernel_init=_init,
                              dtype=self.dtype)

  def _check_tokens(self, tokens, limit: int, what: str):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"TransformerLM: tokens must be integer ids [B, T], got shape "
                       f"{tuple(tokens.shape)} dtype {tokens.dtype}.")
    if tokens.shape[1] > limit:
      raise ValueError(f"TransformerLM: tokens have length {tokens.shape[1]} but {what} is "
                       f"{limit}.")

  def _logits(self, hidden):
    if self.tie_embeddings:
      logits = self.embed.attend(hidden)
    else:
      logits = self.unembed(hidden)
    return logits.astype(jnp.float32)

  def __call__(self, tokens, *, train: bool = False) -> Output:
    """tokens [B, T] int -> Output(logits [B, T, V] float32, taps); `train` changes nothing."""
    del train  # No dropout, no batch statistics.
    self._check_tokens(tokens, self.max_length, "max_length")
    positions = jnp.arange(tokens.shape[1])
    x = self.embed(tokens)
    features = {}
    for i, block in enumerate(self.blocks, start=1):
      x, probabilities, _ = block(x, positions)
      features[f"block{i}"] = x
      features[f"attention{i}"] = probabilities
    hidden = self.final_norm(x)
    features["hidden"] = features["embedding"] = hidden
    logits = self._logits(hidden)  # Creates the untied unembedding's parameters first, at init.
    features["unembedding"] = (self.embed.embedding.T if self.tie_embeddings
                               else self.unembed.variables["params"]["kernel"])
    return Output(logits, features)

  def decode(self, tokens, cache: KVCache) -> Tuple[jax.Array, KVCache]:
    """Runs tokens [B, T] at positions cache.index .. cache.index + T - 1.

    The caller keeps `cache.index + T <= L` (the cache length): past it the writes would be
    clamped by `dynamic_update_slice`, and a traced index cannot be checked here.

    Returns:
      (logits [B, T, V] float32, the cache with these positions written and index + T).
    """
    cache_length = cache.keys[0].shape[2]
    self._check_tokens(tokens, cache_length, "the KV cache length")
    positions = cache.index + jnp.arange(tokens.shape[1])
    x = self.embed(tokens)
    keys, values = [], []
    for block, block_keys, block_values in zip(self.blocks, cache.keys, cache.values):
      x, _, (new_keys, new_values) = block(x, positions, (block_keys, block_values, cache.index))
      keys.append(new_keys)
      values.append(new_values)
    logits = self._logits(self.final_norm(x))
    return logits, KVCache(tuple(keys), tuple(values), cache.index + tokens.shape[1])

  @nn.nowrap
  def init_cache(self, batch_size: int, max_length: Optional[int] = None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` (default: the model's)."""
    max_length = self.max_length if max_length is None else max_length
    if not 0 < max_length <= self.max_length:
      raise ValueError(f"TransformerLM.init_cache: max_length={max_length} must be in "
                       f"[1, {self.max_length}] (the model's max_length).")
    shape = (batch_size, self.num_heads, max_length, self.embed_dim // self.num_heads)
    zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(self.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def unembedding_matrix(params) -> jax.Array:
  """The [D, V] matrix with `logits = hidden @ unembedding_matrix(params)` (tied or untied).

  `params` is a TransformerLM's `variables['params']`.
  """
  if "unembed" in params:
    return params["unembed"]["kernel"]
  return params["embed"]["embedding"].T


def parameter_count(*, vocab_size: int, num_layers: int, embed_dim: int, mlp_dim: int,
                    tie_embeddings: bool = True, **unused) -> int:
  """The parameter count of a TransformerLM from its shape (the module docstring's formula)."""
  del unused
  dim = embed_dim
  block = 4 * dim * dim + 3 * dim * mlp_dim + 2 * dim  # q, k, v, out; gate, up, down; 2 norms.
  unembed = 0 if tie_embeddings else dim * vocab_size
  return vocab_size * dim + num_layers * block + dim + unembed


SIZES = {
    "lm_tiny": dict(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64),
    "lm_student": dict(num_layers=4, embed_dim=128, num_heads=4, mlp_dim=192),
    "lm_teacher": dict(num_layers=6, embed_dim=256, num_heads=8, mlp_dim=512),
}


def _factory(name):
  def build(num_classes: int = 259, **kwargs) -> TransformerLM:
    fields = dict(SIZES[name], max_length=512)
    fields.update(kwargs)
    return TransformerLM(vocab_size=num_classes, **fields)
  build.__name__ = build.__qualname__ = name
  build.__doc__ = (f"TransformerLM {name}: {SIZES[name]}, max_length 512; `num_classes` is the "
                   "vocabulary size; keyword arguments override the TransformerLM fields.")
  return build


lm_tiny = _factory("lm_tiny")
lm_student = _factory("lm_student")
lm_teacher = _factory("lm_teacher")

# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {
    "lm_tiny": (lm_tiny, "tokens", False),
    "lm_student": (lm_student, "tokens", False),
    "lm_teacher": (lm_teacher, "tokens", False),
}
