"""model_type -> the Flax module class and the checkpoint tensor mapping of that family."""

from typing import Any, Callable, NamedTuple, Type

import jax.numpy as jnp

from kdjax.models.pretrained import gemma2, gpt2, llama, names
from kdjax.models.pretrained.config import PretrainedConfig
from kdjax.models.pretrained.decoder import DecoderLM


class Family(NamedTuple):
  module: Type[DecoderLM]
  tensors: Callable[[PretrainedConfig], names.Mapping]


FAMILIES = {
    "llama": Family(llama.LlamaLM, llama.tensors),
    "qwen2": Family(llama.LlamaLM, llama.tensors),
    "qwen3": Family(llama.LlamaLM, llama.tensors),
    "gemma2": Family(gemma2.Gemma2LM, gemma2.tensors),
    "gpt2": Family(gpt2.GPT2LM, gpt2.tensors),
}


def build_module(config: PretrainedConfig, dtype: Any = jnp.float32) -> DecoderLM:
  """The Flax module of `config`'s family, computing in `dtype`."""
  return FAMILIES[config.model_type].module(config, dtype=dtype)


def tensor_mapping(config: PretrainedConfig) -> names.Mapping:
  """The checkpoint tensors of `config`'s architecture and the parameters they become."""
  return FAMILIES[config.model_type].tensors(config)
