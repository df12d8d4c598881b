"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

Learned absolute position embeddings added to the token embeddings; pre-LayerNorm blocks
`x + attention(ln(x))`, `x + mlp(ln(x))` with biases everywhere, multi-head attention
scaled by `d ** -0.5`, an MLP `down(gelu_new(up(x)))`; a final LayerNorm; the unembedding
tied to the token embedding. transformers stores GPT-2's projections as `Conv1D` with weights
[in, out] (Flax's layout, no transpose) and the three attention projections fused in one
`c_attn` [D, 3D], split here into query, key and value:

  embed/embedding [V, D]                   transformer.wte.weight
  position_embed/embedding [P, D]          transformer.wpe.weight
  blocks_{i}/attention_norm/{scale,bias}   transformer.h.{i}.ln_1.{weight,bias}
  blocks_{i}/attention/{query,key,value}/{kernel [D, D], bias [D]}
                                           transformer.h.{i}.attn.c_attn.{weight,bias} (split)
  blocks_{i}/attention/out/{kernel,bias}   transformer.h.{i}.attn.c_proj.{weight,bias}
  blocks_{i}/mlp_norm/{scale,bias}         transformer.h.{i}.ln_2.{weight,bias}
  blocks_{i}/mlp/up/{kernel [D, M],bias}   transformer.h.{i}.mlp.c_fc.{weight,bias}
  blocks_{i}/mlp/down/{kernel,bias}        transformer.h.{i}.mlp.c_proj.{weight,bias}
  final_norm/{scale,bias}                  transformer.ln_f.{weight,bias}

Checkpoints written by older transformers versions (e.g. the Hub's `gpt2`) name the tensors
without the `transformer.` prefix and may carry the `attn.bias` / `attn.masked_bias` causal-mask
buffers; `checkpoint.py` accepts both.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.pretrained import names
from kdjax.models.pretrained.config import PretrainedConfig
from kdjax.models.pretrained.decoder import DecoderLM
from kdjax.models.pretrained.layers import ACTIVATIONS, Attention


class GPT2MLP(nn.Module):
  config: PretrainedConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="up")(x)
    hidden = ACTIVATIONS[self.config.activation](hidden)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(hidden)


class GPT2Block(nn.Module):
  """x + attention(layer_norm(x)), then x + mlp(layer_norm(x))."""
  config: PretrainedConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv=None):
    norm = lambda name: nn.LayerNorm(epsilon=self.config.norm_eps, dtype=self.dtype, name=name)
    attended, new_kv = Attention(self.config, rope=False, dtype=self.dtype, name="attention")(
        norm("attention_norm")(x), positions, kv)
    x = x + attended
    return x + GPT2MLP(self.config, self.dtype, name="mlp")(norm("mlp_norm")(x)), new_kv


class GPT2LM(DecoderLM):
  """GPT-2 causal LM (the contract of `decoder.DecoderLM`)."""

  def setup(self):
    config = self.config
    self.embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype)
    self.position_embed = nn.Embed(config.max_position_embeddings, config.hidden_size,
                                   dtype=self.dtype)
    self.blocks = [GPT2Block(config, self.dtype) for _ in range(config.num_layers)]
    self.final_norm = nn.LayerNorm(epsilon=config.norm_eps, dtype=self.dtype)
    if not config.tie_embeddings:
      self.unembed = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype)

  def _embed(self, tokens, positions):
    return self.embed(tokens) + self.position_embed(positions)[None]


def tensors(config: PretrainedConfig) -> names.Mapping:
  """The transformers tensors of a GPT-2 checkpoint and their parameters."""
  hidden, mlp = config.hidden_size, config.intermediate_size
  entries = [names.copy("transformer.wte.weight", "embed/embedding", (config.vocab_size, hidden)),
             names.copy("transformer.wpe.weight", "position_embed/embedding",
                        (config.max_position_embeddings, hidden))]
  for i in range(config.num_layers):
    layer, block = f"transformer.h.{i}", f"blocks_{i}"
    for hf, ours in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
      entries += [names.copy(f"{layer}.{hf}.weight", f"{block}/{ours}/scale", (hidden,)),
                  names.copy(f"{layer}.{hf}.bias", f"{block}/{ours}/bias", (hidden,))]
    qkv = tuple(f"{block}/attention/{part}" for part in ("query", "key", "value"))
    entries += [
        names.Entry(f"{layer}.attn.c_attn.weight", (hidden, 3 * hidden),
                    tuple(f"{p}/kernel" for p in qkv), names.SPLIT),
        names.Entry(f"{layer}.attn.c_attn.bias", (3 * hidden,), tuple(f"{p}/bias" for p in qkv),
                    names.SPLIT),
        names.copy(f"{layer}.attn.c_proj.weight", f"{block}/attention/out/kernel",
                   (hidden, hidden)),
        names.copy(f"{layer}.attn.c_proj.bias", f"{block}/attention/out/bias", (hidden,)),
        names.copy(f"{layer}.mlp.c_fc.weight", f"{block}/mlp/up/kernel", (hidden, mlp)),
        names.copy(f"{layer}.mlp.c_fc.bias", f"{block}/mlp/up/bias", (mlp,)),
        names.copy(f"{layer}.mlp.c_proj.weight", f"{block}/mlp/down/kernel", (mlp, hidden)),
        names.copy(f"{layer}.mlp.c_proj.bias", f"{block}/mlp/down/bias", (hidden,)),
    ]
  entries += [names.copy("transformer.ln_f.weight", "final_norm/scale", (hidden,)),
              names.copy("transformer.ln_f.bias", "final_norm/bias", (hidden,))]
  return entries + names.lm_head(config)
