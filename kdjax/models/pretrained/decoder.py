"""`DecoderLM`: the forward pass, KV-cache decoding and taps every pretrained family shares.

A family subclasses it and defines `setup` (the submodules `embed`, `blocks`, `final_norm`
and, when untied, `unembed`) and may override `_embed` (position embeddings, embedding
scaling) and `_logits` (soft-capping). The LM contract of `kdjax.models.transformer`:

  __call__(tokens [B, T], *, train=False) -> Output(logits [B, T, V] float32, features) with
    'hidden'    [B, T, D]  the final norm's output, the unembedding's input
                           (`hidden @ unembedding_matrix(params)` are the logits before any
                           final soft-capping);
    'embedding' [B, T, D]  the same array (kdjax's pre-logit tap);
    'block{i}'  [B, T, D]  the residual stream after block i (i = 1..num_layers);
    'unembedding' [D, V]   `unembedding_matrix(params)` itself (not a per-token tap), so that
                           a loss holding only the Output computes the logits block by block
                           (`kdjax.losses.fused_*`, `kdjax.methods.lm_fused`); absent when the
                           logits are soft-capped (Gemma 2's `final_logit_softcapping`),
                           which those losses do not compute.
  init_cache(batch_size, max_length) -> KVCache with per layer [B, K, L, d] keys and values;
  decode(tokens [B, T], cache) -> (logits [B, T, V] float32, cache with index + T), equal to
    the full forward's logits at positions index .. index + T - 1.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output
from kdjax.models.pretrained.config import SLIDING, PretrainedConfig
# The same pytree as TransformerLM's cache: code that carries one carries the other.
from kdjax.models.transformer import KVCache


class DecoderLM(nn.Module):
  """Base of the pretrained families (see the module docstring).

  Attributes:
    config: the architecture.
    dtype: the compute dtype (parameters keep the dtype they are loaded in; attention
      softmax, norms and the returned logits are float32).
  """
  config: PretrainedConfig
  dtype: Any = jnp.float32

  @property
  def max_length(self) -> int:
    """The longest sequence (and KV cache): config.max_position_embeddings."""
    return self.config.max_position_embeddings

  def _is_sliding(self, layer: int) -> bool:
    return self.config.layer_types[layer] == SLIDING

  def _embed(self, tokens, positions):
    del positions
    return self.embed(tokens)

  def _unembed(self, hidden):
    if self.config.tie_embeddings:
      return self.embed.attend(hidden)
    return self.unembed(hidden)

  def _logits(self, hidden):
    return self._unembed(hidden).astype(jnp.float32)

  def _check_tokens(self, tokens, limit: int, what: str):
    name = type(self).__name__
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{name}: tokens must be integer ids [B, T], got shape "
                       f"{tuple(tokens.shape)} dtype {tokens.dtype}.")
    if tokens.shape[1] > limit:
      raise ValueError(f"{name}: tokens have length {tokens.shape[1]} but {what} is {limit}.")

  def __call__(self, tokens, *, train: bool = False) -> Output:
    """tokens [B, T] int -> Output(logits [B, T, V] float32, taps); `train` changes nothing."""
    del train  # Inference-time modules: no dropout.
    self._check_tokens(tokens, self.max_length, "max_position_embeddings")
    positions = jnp.arange(tokens.shape[1])
    x = self._embed(tokens, positions)
    features = {}
    for i, block in enumerate(self.blocks, start=1):
      x, _ = block(x, positions)
      features[f"block{i}"] = x
    hidden = self.final_norm(x)
    features["hidden"] = features["embedding"] = hidden
    logits = self._logits(hidden)  # Creates the unembedding's parameters first, at init.
    if self.config.final_logit_softcapping is None:
      features["unembedding"] = (self.embed.embedding.T if self.config.tie_embeddings
                                 else self.unembed.variables["params"]["kernel"])
    return Output(logits, features)

  def decode(self, tokens, cache: KVCache) -> Tuple[jax.Array, KVCache]:
    """Runs tokens [B, T] at positions cache.index .. cache.index + T - 1.

    The caller keeps `cache.index + T <= L` (past it `dynamic_update_slice` would clamp the
    writes, and a traced index cannot be checked here).
    """
    self._check_tokens(tokens, cache.keys[0].shape[2], "the KV cache length")
    positions = cache.index + jnp.arange(tokens.shape[1])
    x = self._embed(tokens, positions)
    keys, values = [], []
    for block, block_keys, block_values in zip(self.blocks, cache.keys, cache.values):
      x, (new_keys, new_values) = block(x, positions, (block_keys, block_values, cache.index))
      keys.append(new_keys)
      values.append(new_values)
    logits = self._logits(self.final_norm(x))
    return logits, KVCache(tuple(keys), tuple(values), cache.index + tokens.shape[1])

  @nn.nowrap
  def init_cache(self, batch_size: int, max_length: Optional[int] = None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` (default: the model's)."""
    max_length = self.max_length if max_length is None else max_length
    if not 0 < max_length <= self.max_length:
      raise ValueError(f"{type(self).__name__}.init_cache: max_length={max_length} must be in "
                       f"[1, {self.max_length}] (max_position_embeddings).")
    config = self.config
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(config.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def unembedding_matrix(params) -> jax.Array:
  """The [D, V] matrix with `hidden @ unembedding_matrix(params)` = the logits (tied or not).

  For every family; Gemma 2's logits are then soft-capped (`layers.soft_cap` with
  `config.final_logit_softcapping`), which a fused loss computing logits block by block must
  apply itself. `params` is the module's `variables['params']`.
  """
  if "unembed" in params:
    return params["unembed"]["kernel"]
  return params["embed"]["embedding"].T
