"""`load_pretrained` / `save_pretrained`: a Hugging Face-format directory in and out.

    pretrained = load_pretrained("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16)
    output = pretrained.apply_fn(pretrained.variables, tokens)       # Output(logits, features)
    ids = pretrained.tokenizer.encode(render_chat(pretrained.chat_template, messages,
                                                  add_generation_prompt=True)).ids
    save_pretrained("out/student", trained_variables, pretrained.config,
                    tokenizer=pretrained.tokenizer, chat_template=pretrained.chat_template)

A directory holds `config.json`, `model.safetensors` (or shards and
`model.safetensors.index.json`) and optionally `tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`. Nothing here imports torch or transformers.

kdjax's own `lm_*` TransformerLM is a Llama without biases (RMSNorm eps 1e-6, SwiGLU, RoPE in
the same rotate-half layout with frequencies `base^(-2j/d)`, scores scaled by `d ** -0.5`, no
grouped queries), so `transformer_lm_as_llama` maps it exactly onto a `llama` checkpoint.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.output import Output
from kdjax.models.pretrained import checkpoint, names, tokenizer as tokenizer_lib
from kdjax.models.pretrained.config import FULL, PretrainedConfig, from_hf
from kdjax.models.pretrained.decoder import DecoderLM, unembedding_matrix
from kdjax.models.pretrained.families import build_module, tensor_mapping

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded checkpoint.

  Attributes:
    apply_fn: `apply_fn(variables, tokens [B, T], *, train=False, rng=None) -> Output`
      (`kdjax.models.apply_fn(module)` gives the train step's `(Output, state)` form).
    variables: `{'params': ...}` as jax arrays.
    tokenizer: a `tokenizers.Tokenizer`, or None when the directory has no tokenizer.json.
    config: the `PretrainedConfig`.
    module: the Flax module (`decode` / `init_cache` for KV-cache generation).
    chat_template: the jinja chat template, or None (`render_chat`).
    special_tokens: `bos_token`, `eos_token`, ... strings from tokenizer_config.json.
  """
  apply_fn: Callable[..., Output]
  variables: Dict[str, Any]
  tokenizer: Any
  config: PretrainedConfig
  module: DecoderLM
  chat_template: Optional[str]
  special_tokens: Dict[str, str]

  def unembedding_matrix(self) -> jax.Array:
    """The [D, V] unembedding of `variables` (the fused losses' input)."""
    return unembedding_matrix(self.variables["params"])


def read_config(directory: str) -> PretrainedConfig:
  """The architecture in `directory/config.json` (one-line errors)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise ValueError(f"load_pretrained: {directory} is not a directory.")
  if not os.path.exists(path):
    raise ValueError(f"load_pretrained: {directory} has no {CONFIG_FILE}.")
  with open(path) as f:
    return from_hf(json.load(f), where=path)


def _compute_dtype(tensors) -> Any:
  floating = {t.dtype for t in tensors.values() if np.issubdtype(t.dtype, np.floating)
              or t.dtype == jnp.bfloat16}
  return jnp.float32 if not floating or np.float32 in floating else sorted(floating, key=str)[0]


def load_pretrained(directory: str, *, dtype: Any = None) -> Pretrained:
  """Loads a Hugging Face-format causal LM directory (see the module docstring).

  Args:
    directory: holds config.json and the safetensors; `~` is expanded.
    dtype: parameters and compute dtype (e.g. `jnp.bfloat16` for a teacher); None keeps the
      checkpoint's dtype (float32 compute for a float32 checkpoint).

  Returns:
    A `Pretrained`. Unsupported architectures, missing / unexpected / mis-shaped tensors and
    a tokenizer larger than the model's vocabulary raise ValueError in one line.
  """
  directory = os.path.expanduser(directory)
  config = read_config(directory)
  entries = tensor_mapping(config)
  tensors = checkpoint.read_tensors(directory, config, entries)
  compute_dtype = jnp.dtype(dtype) if dtype is not None else _compute_dtype(tensors)
  cast = (lambda x: jnp.asarray(x, compute_dtype)) if dtype is not None else jnp.asarray
  params = jax.tree_util.tree_map(cast, names.to_params(entries, tensors))
  tokenizer = tokenizer_lib.load_tokenizer(directory)
  if tokenizer is not None:
    tokenizer_lib.check_vocabulary(tokenizer, config.vocab_size, directory)
  module = build_module(config, compute_dtype)

  def apply_fn(variables, tokens, *, train: bool = False, rng=None) -> Output:
    del rng  # No dropout.
    return module.apply(variables, tokens, train=train)

  return Pretrained(apply_fn=apply_fn, variables={"params": params}, tokenizer=tokenizer,
                    config=config, module=module,
                    chat_template=tokenizer_lib.load_chat_template(directory),
                    special_tokens=tokenizer_lib.special_tokens(directory))


def _dtype_name(params) -> str:
  dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
  return "bfloat16" if jnp.dtype(jnp.bfloat16) in dtypes else str(sorted(dtypes, key=str)[0])


def save_pretrained(directory: str, variables, config: PretrainedConfig, *, tokenizer=None,
                    chat_template: Optional[str] = None,
                    special_tokens: Optional[Dict[str, str]] = None) -> None:
  """Writes `variables` of a `config` model as a directory transformers loads.

  `transformers.AutoModelForCausalLM.from_pretrained(directory)` gives the same logits; the
  parameters are written in their own dtype.

  Args:
    directory: created if needed; `~` is expanded.
    variables: `{'params': ...}` (or the params tree itself) of `build_module(config)`.
    config: the architecture (`Pretrained.config`, or `transformer_lm_as_llama`'s).
    tokenizer: a `tokenizers.Tokenizer` to write as tokenizer.json, with a
      tokenizer_config.json that transformers' `AutoTokenizer` reads.
    chat_template: written to tokenizer_config.json and chat_template.jinja.
    special_tokens: `bos_token`, `eos_token`, ... strings for tokenizer_config.json.
  """
  directory = os.path.expanduser(directory)
  params = variables.get("params", variables) if isinstance(variables, dict) else variables
  entries = tensor_mapping(config)
  checkpoint.check_params(params, entries, f"save_pretrained({directory})")
  os.makedirs(directory, exist_ok=True)
  tensors = names.from_params(entries, jax.device_get(params))
  checkpoint.write_tensors(os.path.join(directory, checkpoint.SINGLE_FILE), tensors)
  hf = dict(config.to_hf(), dtype=_dtype_name(params))
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer_lib.check_vocabulary(tokenizer, config.vocab_size, directory)
    tokenizer.save(os.path.join(directory, tokenizer_lib.TOKENIZER_FILE))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **(special_tokens or {})}
    if chat_template is not None:
      tokenizer_config["chat_template"] = chat_template
    with open(os.path.join(directory, tokenizer_lib.TOKENIZER_CONFIG_FILE), "w") as f:
      json.dump(tokenizer_config, f, indent=2)
  if chat_template is not None:
    with open(os.path.join(directory, tokenizer_lib.CHAT_TEMPLATE_FILE), "w") as f:
      f.write(chat_template)


def transformer_lm_as_llama(module, variables) -> Tuple[Dict[str, Any], PretrainedConfig]:
  """kdjax's `TransformerLM` (`lm_tiny`, `lm_student`, ...) as `llama` variables and config.

  The math is the same (see the module docstring); only parameter paths move (the block's
  gate/up/down go under `mlp/`). `save_pretrained(dir, *transformer_lm_as_llama(m, v))` then
  writes a checkpoint transformers runs with equal logits.
  """
  from kdjax.models import transformer  # pylint: disable=g-import-not-at-top
  if not isinstance(module, transformer.TransformerLM):
    raise TypeError(f"transformer_lm_as_llama: expected a TransformerLM, got "
                    f"{type(module).__name__}.")
  config = PretrainedConfig(
      model_type="llama", vocab_size=module.vocab_size, hidden_size=module.embed_dim,
      intermediate_size=module.mlp_dim, num_layers=module.num_layers,
      num_heads=module.num_heads, num_kv_heads=module.num_heads,
      head_dim=module.embed_dim // module.num_heads, max_position_embeddings=module.max_length,
      norm_eps=transformer._NORM_EPS, activation="silu",  # pylint: disable=protected-access
      tie_embeddings=module.tie_embeddings, rope_theta=float(module.rope_base),
      layer_types=(FULL,) * module.num_layers)
  params = dict(variables.get("params", variables))
  converted = {key: value for key, value in params.items() if not key.startswith("blocks_")}
  for i in range(module.num_layers):
    block = dict(params[f"blocks_{i}"])
    block["mlp"] = {name: block.pop(name) for name in ("gate", "up", "down")}
    converted[f"blocks_{i}"] = block
  return {"params": converted}, config
