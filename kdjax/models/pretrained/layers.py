"""Layers the pretrained families share: RMSNorm, RoPE, grouped-query attention, gated MLP.

Each layer computes what the corresponding transformers 5.x module computes, in the same
order of operations where the order changes float32 results (scores scaled after the q k^T
product, norms and softmax in float32), so that float32 logits agree to ~1e-6.

Shapes: `B` batch, `T` query positions, `S` key positions, `H` query heads, `K` key/value
heads (`H = K G`, grouped-query attention, Ainslie et al. 2023), `d` head width, `L` KV-cache
length.
"""

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.pretrained.config import PretrainedConfig

# transformers' ACT2FN names: "gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019) over the last axis, statistics in float32.

  `offset=0` (Llama, Qwen): `scale * (x / rms(x))` cast to the input dtype before the
  product, as LlamaRMSNorm. `offset=1` (Gemma): `(x / rms(x)) * (1 + scale)` in float32,
  then cast, as Gemma2RMSNorm; its `scale` is stored as in the checkpoint (0 is identity).
  """
  epsilon: float
  offset: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    if self.offset:
      out = normed * (self.offset + scale.astype(jnp.float32))
    else:
      out = scale.astype(self.dtype) * normed.astype(self.dtype)
    return out.astype(self.dtype)


def rope_frequencies(config: PretrainedConfig) -> np.ndarray:
  """[d / 2] float32 inverse frequencies `theta^(-2j/d)`, with the config's RoPE scaling.

  `linear` divides them by `factor` (position interpolation, Chen et al. 2023). `llama3`
  (Llama 3.1) leaves wavelengths below `original_max_position_embeddings / high_freq_factor`
  as they are, divides those above `original / low_freq_factor` by `factor`, and interpolates
  smoothly in between (transformers' `_compute_llama3_parameters`).
  """
  d = config.head_dim
  inverse = (1.0 / (np.float32(config.rope_theta)
                    ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
  scaling = config.scaling
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    return (inverse / np.float32(scaling["factor"])).astype(np.float32)
  if rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_length = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inverse
    scaled = np.where(wavelength > old_length / low, inverse / factor, inverse)
    smooth = (old_length / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_length / high) & (wavelength <= old_length / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inverse


def apply_rope(x: jax.Array, positions: jax.Array, inverse_frequencies: np.ndarray) -> jax.Array:
  """Rotary embedding (Su et al. 2021) in the "rotate half" layout of GPT-NeoX / transformers.

  Args:
    x: [B, T, heads, d] queries or keys.
    positions: [T] absolute positions.
    inverse_frequencies: [d / 2] from `rope_frequencies`.

  Returns:
    [B, T, heads, d] in x's dtype: channels (j, j + d/2) rotated by `position * inverse[j]`.
  """
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inverse_frequencies)[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]  # [1, T, 1, d]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask(query_positions, key_positions, window: Optional[int]) -> jax.Array:
  """[T, S] bool: key position <= query position, and within the last `window` positions."""
  allowed = key_positions[None, :] <= query_positions[:, None]
  if window is not None:
    allowed &= key_positions[None, :] > query_positions[:, None] - window
  return allowed


class Attention(nn.Module):
  """Causal grouped-query self-attention with optional RoPE, q/k norm, window and soft-capping.

  Parameters: `query [D, H d]`, `key`/`value` `[D, K d]`, `out [H d, D]` kernels (and biases
  per the config); `query_norm`/`key_norm` `[d]` scales with `qk_norm`.

  `__call__(x [B, T, D], positions [T], kv=None)` returns `(out [B, T, D], new kv)`. Without
  `kv` the keys are this call's own; with `kv = (keys, values, index)`, `[B, K, L, d]` each,
  this call's keys and values are written at `index` and the queries attend to the L slots
  (slots not yet written lie after every query position and are masked).
  """
  config: PretrainedConfig
  sliding: bool = False
  rope: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    config = self.config
    batch, length, _ = x.shape
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    dense = lambda width, bias, name: nn.Dense(width, use_bias=bias, dtype=self.dtype,
                                               name=name)
    query = dense(heads * d, config.qkv_bias, "query")(x).reshape(batch, length, heads, d)
    key = dense(kv_heads * d, config.qkv_bias, "key")(x).reshape(batch, length, kv_heads, d)
    value = dense(kv_heads * d, config.qkv_bias, "value")(x).reshape(batch, length, kv_heads, d)
    if config.qk_norm:  # Qwen3: RMSNorm per head before RoPE.
      query = RMSNorm(config.norm_eps, dtype=self.dtype, name="query_norm")(query)
      key = RMSNorm(config.norm_eps, dtype=self.dtype, name="key_norm")(key)
    if self.rope:
      frequencies = rope_frequencies(config)
      query = apply_rope(query, positions, frequencies)
      key = apply_rope(key, positions, frequencies)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, K, T, d]
    new_kv = None
    if kv is None:
      key_positions = positions
    else:
      cached_keys, cached_values, index = kv
      start = (0, 0, index, 0)
      key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), start)
      value = jax.lax.dynamic_update_slice(cached_values, value.astype(cached_values.dtype),
                                           start)
      key_positions = jnp.arange(key.shape[2])
      new_kv = (key, value)

    groups = heads // kv_heads
    # Query head h reads key/value head h // groups (transformers' repeat_kv).
    query = query.transpose(0, 2, 1, 3).reshape(batch, kv_heads, groups, length, d)
    scale = (config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None
             else d) ** -0.5
    scores = jnp.einsum("bkgqd,bksd->bkgqs", query, key.astype(query.dtype),
                        preferred_element_type=jnp.float32) * scale
    if config.attn_logit_softcapping is not None:
      cap = config.attn_logit_softcapping
      scores = jnp.tanh(scores / cap) * cap
    allowed = attention_mask(positions, key_positions,
                             config.sliding_window if self.sliding else None)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgqs,bksd->bkgqd", probabilities, value.astype(probabilities.dtype))
    out = out.reshape(batch, heads, length, d).transpose(0, 2, 1, 3)
    out = out.reshape(batch, length, heads * d).astype(self.dtype)
    return dense(x.shape[-1], config.out_bias, "out")(out), new_kv


class GatedMLP(nn.Module):
  """`down(act(gate(x)) * up(x))`: SwiGLU (Llama, Qwen) or GeGLU (Gemma), Shazeer 2020."""
  config: PretrainedConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    config = self.config
    dense = lambda width, name: nn.Dense(width, use_bias=config.mlp_bias, dtype=self.dtype,
                                         name=name)
    activation = ACTIVATIONS[config.activation]
    hidden = activation(dense(config.intermediate_size, "gate")(x)) * dense(
        config.intermediate_size, "up")(x)
    return dense(x.shape[-1], "down")(hidden)


def soft_cap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """`cap tanh(x / cap)` (Gemma 2's logit soft-capping), or x when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap
