"""Llama 1/2/3 (Touvron et al. 2023; Meta 2024), Qwen2/2.5 and Qwen3 (Qwen team 2024, 2025).

One decoder, three flag settings (`PretrainedConfig`): pre-norm blocks
`x + attention(rms_norm(x))`, `x + swiglu(rms_norm(x))`, RoPE with optional `llama3` scaling,
grouped-query attention; Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm of queries and
keys (and a free `head_dim`). Parameters, with their transformers names:

  embed/embedding [V, D]                         model.embed_tokens.weight
  blocks_{i}/attention_norm/scale [D]            model.layers.{i}.input_layernorm.weight
  blocks_{i}/attention/query/kernel [D, H d]     model.layers.{i}.self_attn.q_proj.weight (.T)
  blocks_{i}/attention/{key,value}/kernel [D, K d]      ... k_proj, v_proj (.T); biases as is
  blocks_{i}/attention/out/kernel [H d, D]       ... self_attn.o_proj.weight (.T)
  blocks_{i}/attention/{query,key}_norm/scale [d] ... self_attn.{q,k}_norm.weight (Qwen3)
  blocks_{i}/mlp_norm/scale [D]                  model.layers.{i}.post_attention_layernorm.weight
  blocks_{i}/mlp/{gate,up}/kernel [D, M]         model.layers.{i}.mlp.{gate,up}_proj.weight (.T)
  blocks_{i}/mlp/down/kernel [M, D]              model.layers.{i}.mlp.down_proj.weight (.T)
  final_norm/scale [D]                           model.norm.weight
  unembed/kernel [D, V] (untied only)            lm_head.weight (.T)
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.pretrained import names
from kdjax.models.pretrained.config import PretrainedConfig
from kdjax.models.pretrained.decoder import DecoderLM
from kdjax.models.pretrained.layers import Attention, GatedMLP, RMSNorm


class LlamaBlock(nn.Module):
  """Pre-norm block: x + attention(rms_norm(x)), then x + gated_mlp(rms_norm(x))."""
  config: PretrainedConfig
  sliding: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    norm = lambda name: RMSNorm(self.config.norm_eps, dtype=self.dtype, name=name)
    attended, new_kv = Attention(self.config, self.sliding, dtype=self.dtype, name="attention")(
        norm("attention_norm")(x), positions, kv)
    x = x + attended
    x = x + GatedMLP(self.config, dtype=self.dtype, name="mlp")(norm("mlp_norm")(x))
    return x, new_kv


class LlamaLM(DecoderLM):
  """Llama / Qwen2 / Qwen3 causal LM (the contract of `decoder.DecoderLM`)."""

  def setup(self):
    config = self.config
    self.embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype)
    self.blocks = [LlamaBlock(config, self._is_sliding(i), self.dtype)
                   for i in range(config.num_layers)]
    self.final_norm = RMSNorm(config.norm_eps, dtype=self.dtype)
    if not config.tie_embeddings:
      self.unembed = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype)


def tensors(config: PretrainedConfig) -> names.Mapping:
  """The transformers tensors of a Llama / Qwen2 / Qwen3 checkpoint and their parameters."""
  entries = [names.copy("model.embed_tokens.weight", "embed/embedding",
                        (config.vocab_size, config.hidden_size)),
             names.copy("model.norm.weight", "final_norm/scale", (config.hidden_size,))]
  for i in range(config.num_layers):
    entries += names.decoder_layer(config, i, {"input_layernorm": "attention_norm",
                                               "post_attention_layernorm": "mlp_norm"})
  return entries + names.lm_head(config)
