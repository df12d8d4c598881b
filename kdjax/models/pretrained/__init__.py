"""Pretrained causal language models in Flax: Llama, Qwen2/3, Gemma 2, GPT-2 checkpoints in/out.

    from kdjax.models.pretrained import load_pretrained, save_pretrained, render_chat
    pretrained = load_pretrained("path/to/hf_directory")
    output = pretrained.apply_fn(pretrained.variables, tokens)   # Output(logits [B, T, V], ...)

Files: `config.py` (config.json <-> `PretrainedConfig`), `layers.py` (RMSNorm, RoPE,
grouped-query attention, gated MLP), `decoder.py` (forward, KV cache and taps shared by every
family), `llama.py` (Llama / Qwen2 / Qwen3), `gemma2.py`, `gpt2.py`, `names.py` (checkpoint
tensor <-> parameter), `checkpoint.py` (safetensors, checked), `tokenizer.py` (tokenizer.json,
chat template), `directory.py` (`load_pretrained`, `save_pretrained`), `model_entry.py` (the
model name 'pretrained' in configs).
"""

from kdjax.models.pretrained.config import SUPPORTED_MODEL_TYPES, PretrainedConfig, from_hf
from kdjax.models.pretrained.decoder import DecoderLM, unembedding_matrix
from kdjax.models.pretrained.directory import (Pretrained, load_pretrained, read_config,
                                               save_pretrained, transformer_lm_as_llama)
from kdjax.models.pretrained.families import build_module
from kdjax.models.pretrained.tokenizer import render_chat
from kdjax.models.pretrained import model_entry

model_entry.register()  # The model name 'pretrained' in configs.

__all__ = ["SUPPORTED_MODEL_TYPES", "PretrainedConfig", "from_hf", "DecoderLM",
           "unembedding_matrix", "Pretrained", "load_pretrained", "read_config",
           "save_pretrained", "transformer_lm_as_llama", "build_module", "render_chat"]
