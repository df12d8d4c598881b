"""Gemma 2 (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size").

What differs from Llama: RMSNorm scales `(1 + w)` (zero-initialised); four norms per block,
the attention and MLP outputs normalised before they join the residual
(`x + post_norm(attention(pre_norm(x)))`, likewise the MLP); GeGLU with the tanh GELU; the
embedding multiplied by `sqrt(D)` (rounded to the compute dtype first, as transformers does);
attention scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped
`c tanh(s / c)` (c = attn_logit_softcapping, 50) before the mask; sliding-window attention
(4096) on every other layer starting with the first; the logits soft-capped (30); the
unembedding tied. Parameters as in `llama.py`, with the norms renamed:

  blocks_{i}/attention_norm       model.layers.{i}.input_layernorm
  blocks_{i}/post_attention_norm  model.layers.{i}.post_attention_layernorm
  blocks_{i}/mlp_norm             model.layers.{i}.pre_feedforward_layernorm
  blocks_{i}/post_mlp_norm        model.layers.{i}.post_feedforward_layernorm
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.pretrained import names
from kdjax.models.pretrained.config import PretrainedConfig
from kdjax.models.pretrained.decoder import DecoderLM
from kdjax.models.pretrained.layers import Attention, GatedMLP, RMSNorm, soft_cap

_NORMS = {"input_layernorm": "attention_norm",
          "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "mlp_norm",
          "post_feedforward_layernorm": "post_mlp_norm"}


class Gemma2Block(nn.Module):
  """x + post_norm(attention(norm(x))), then x + post_norm(geglu(norm(x)))."""
  config: PretrainedConfig
  sliding: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    norm = lambda name: RMSNorm(self.config.norm_eps, offset=1.0, dtype=self.dtype, name=name)
    attended, new_kv = Attention(self.config, self.sliding, dtype=self.dtype, name="attention")(
        norm("attention_norm")(x), positions, kv)
    x = x + norm("post_attention_norm")(attended)
    mlp = GatedMLP(self.config, dtype=self.dtype, name="mlp")(norm("mlp_norm")(x))
    return x + norm("post_mlp_norm")(mlp), new_kv


class Gemma2LM(DecoderLM):
  """Gemma 2 causal LM (the contract of `decoder.DecoderLM`; logits soft-capped)."""

  def setup(self):
    config = self.config
    self.embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype)
    self.blocks = [Gemma2Block(config, self._is_sliding(i), self.dtype)
                   for i in range(config.num_layers)]
    self.final_norm = RMSNorm(config.norm_eps, offset=1.0, dtype=self.dtype)
    if not config.tie_embeddings:
      self.unembed = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype)

  def _embed(self, tokens, positions):
    del positions
    x = self.embed(tokens)
    return x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)

  def _logits(self, hidden):
    logits = self._unembed(hidden).astype(jnp.float32)
    return soft_cap(logits, self.config.final_logit_softcapping)


def tensors(config: PretrainedConfig) -> names.Mapping:
  """The transformers tensors of a Gemma 2 checkpoint and their parameters."""
  entries = [names.copy("model.embed_tokens.weight", "embed/embedding",
                        (config.vocab_size, config.hidden_size)),
             names.copy("model.norm.weight", "final_norm/scale", (config.hidden_size,))]
  for i in range(config.num_layers):
    entries += names.decoder_layer(config, i, _NORMS)
  return entries + names.lm_head(config)
