"""`PretrainedConfig`: the architecture of a Hugging Face-format causal LM, parsed from config.json.

One frozen (hashable) dataclass for every supported family, so that it can be a Flax module
attribute and a static argument of `jax.jit`. `from_hf(dict)` reads the fields the forward pass
depends on, with transformers' own defaults for the ones a config.json may leave out
(transformers 5.x: `LlamaConfig`, `Qwen2Config`, `Qwen3Config`, `Gemma2Config`, `GPT2Config`);
`to_hf()` writes a config.json that `transformers.AutoConfig` reads back to the same model.

RoPE settings are read in both spellings: transformers 5's `rope_parameters` dict
(`{"rope_type", "rope_theta", ...}`) and the older top-level `rope_theta` with an optional
`rope_scaling` dict (`"rope_type"` or `"type"`). Supported types: `default`, `linear` and
`llama3` (Llama 3.1's frequency-dependent scaling); anything else is refused.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

from kdjax.validation import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")
# Activation names of transformers' ACT2FN that the families use.
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
FULL, SLIDING = "full_attention", "sliding_attention"

# transformers' defaults for fields a config.json may omit (its configuration_*.py, 5.x).
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu", head_dim=None),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu", head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu", head_dim=128),
    "gemma2": dict(max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", head_dim=256),
}


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
  """The architecture of one checkpoint (see the module docstring).

  Attributes:
    model_type: one of SUPPORTED_MODEL_TYPES.
    vocab_size, hidden_size, intermediate_size: V, D and the MLP width.
    num_layers, num_heads, num_kv_heads, head_dim: depth, query heads H, key/value heads
      (grouped-query attention when < H) and the per-head width.
    max_position_embeddings: the longest sequence (GPT-2's learned positions; the KV cache).
    norm_eps: RMSNorm / LayerNorm epsilon.
    activation: the MLP's activation (ACTIVATIONS).
    tie_embeddings: the unembedding is the token embedding's transpose.
    rope_theta: RoPE's base (unused by GPT-2).
    rope_scaling: `(key, value)` pairs of the RoPE scaling (empty: none), incl. `rope_type`.
    qkv_bias, out_bias, mlp_bias: biases of the q/k/v projections, the attention output
      projection and the MLP projections.
    qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
    layer_types: per layer FULL or SLIDING attention.
    sliding_window: the window of SLIDING layers (a query sees the last `sliding_window`
      positions, itself included).
    query_pre_attn_scalar: attention scores are scaled by `query_pre_attn_scalar ** -0.5`
      (Gemma 2) instead of `head_dim ** -0.5`.
    attn_logit_softcapping, final_logit_softcapping: `c tanh(x / c)` on the attention scores
      and on the logits (Gemma 2), or None.
    bos_token_id, eos_token_id, pad_token_id: special ids, kept for generation and saving.
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  activation: str
  tie_embeddings: bool
  rope_theta: float = 10000.0
  rope_scaling: Tuple[Tuple[str, Any], ...] = ()
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  layer_types: Tuple[str, ...] = ()
  sliding_window: Optional[int] = None
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None  # An int or a tuple of ints.
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"config.json: num_attention_heads={self.num_heads} must be a multiple "
                        f"of num_key_value_heads={self.num_kv_heads}.")
    if self.model_type != "gpt2" and self.head_dim % 2:
      raise ConfigError(f"config.json: head_dim={self.head_dim} must be even (RoPE rotates "
                        "pairs of channels).")
    if len(self.layer_types) != self.num_layers:
      raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries, "
                        f"num_hidden_layers is {self.num_layers}.")

  @property
  def scaling(self) -> Dict[str, Any]:
    """`rope_scaling` as a dict (empty when RoPE is unscaled)."""
    return dict(self.rope_scaling)

  def to_hf(self) -> Dict[str, Any]:
    """A config.json dict that transformers reads back to this architecture."""
    return _TO_HF[self.model_type](self)


def from_hf(hf: Dict[str, Any], where: str = "config.json") -> PretrainedConfig:
  """Parses a config.json dict; unknown families and missing or bad fields fail in one line."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"{where}: model_type={model_type!r} is not supported; supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  return (_gpt2_from_hf if model_type == "gpt2" else _decoder_from_hf)(hf, where)


def _field(hf, name, where, default=dataclasses.MISSING):
  if name in hf and hf[name] is not None:
    return hf[name]
  if default is dataclasses.MISSING:
    raise ConfigError(f"{where}: the field {name!r} is missing (model_type "
                      f"{hf.get('model_type')!r}).")
  return default


def _activation(name, where, field):
  if name not in ACTIVATIONS:
    raise ConfigError(f"{where}: {field}={name!r} is not supported; supported: "
                      f"{', '.join(ACTIVATIONS)}.")
  return name


def _ids(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _rope(hf, where) -> Tuple[float, Tuple[Tuple[str, Any], ...]]:
  """(theta, scaling pairs) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  parameters = dict(hf.get("rope_parameters") or {})
  if not parameters:
    parameters = dict(hf.get("rope_scaling") or {})
    parameters.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  if "type" in parameters and "rope_type" not in parameters:
    parameters["rope_type"] = parameters.pop("type")
  parameters.pop("type", None)
  theta = float(parameters.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = parameters.get("rope_type", "default")
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"{where}: rope_type={rope_type!r} is not supported; supported: "
                      f"{', '.join(ROPE_TYPES)}.")
  if rope_type == "default":
    return theta, ()
  required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}[rope_type]
  for key in required:
    if key not in parameters:
      raise ConfigError(f"{where}: RoPE type {rope_type!r} needs {key!r} in rope_parameters "
                        "(or rope_scaling).")
  return theta, tuple(sorted((key, parameters[key]) for key in ("rope_type",) + required))


def _layer_types(hf, model_type, num_layers, where):
  if hf.get("layer_types"):
    types = tuple(hf["layer_types"])
    bad = sorted(set(types) - {FULL, SLIDING})
    if bad:
      raise ConfigError(f"{where}: layer_types has {bad[0]!r}; allowed: {FULL!r}, {SLIDING!r}.")
    return types
  if model_type == "gemma2":  # Gemma 2 alternates, starting with a sliding-window layer.
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers))
  if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    first = hf.get("max_window_layers", 28)
    return tuple(SLIDING if i >= first else FULL for i in range(num_layers))
  return (FULL,) * num_layers


def _decoder_from_hf(hf, where) -> PretrainedConfig:
  model_type = hf["model_type"]
  defaults = _DEFAULTS[model_type]
  get = lambda name, *default: _field(hf, name, where, *default)
  hidden_size, num_heads = get("hidden_size"), get("num_attention_heads")
  num_layers = get("num_hidden_layers")
  head_dim = get("head_dim", defaults["head_dim"]) or hidden_size // num_heads
  theta, scaling = _rope(hf, where)
  gemma = model_type == "gemma2"
  if gemma and hf.get("use_bidirectional_attention"):
    raise ConfigError(f"{where}: use_bidirectional_attention=true is not supported (kdjax's "
                      "Gemma 2 is a causal LM).")
  attention_bias = bool(get("attention_bias", False))
  layer_types = _layer_types(hf, model_type, num_layers, where)
  return PretrainedConfig(
      model_type=model_type,
      vocab_size=get("vocab_size"),
      hidden_size=hidden_size,
      intermediate_size=get("intermediate_size"),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=get("num_key_value_heads", num_heads),
      head_dim=head_dim,
      max_position_embeddings=get("max_position_embeddings",
                                  defaults["max_position_embeddings"]),
      norm_eps=float(get("rms_norm_eps", defaults["rms_norm_eps"])),
      activation=_activation(
          get("hidden_activation" if gemma else "hidden_act",
              defaults["hidden_activation" if gemma else "hidden_act"]),
          where, "hidden_activation" if gemma else "hidden_act"),
      tie_embeddings=bool(get("tie_word_embeddings", defaults["tie_word_embeddings"])),
      rope_theta=theta,
      rope_scaling=scaling,
      # Qwen2 always has q/k/v biases (and none on o_proj); Llama, Qwen3 and Gemma 2 put
      # `attention_bias` on all four projections.
      qkv_bias=True if model_type == "qwen2" else attention_bias,
      out_bias=False if model_type == "qwen2" else attention_bias,
      mlp_bias=bool(get("mlp_bias", False)) if model_type == "llama" else False,
      qk_norm=model_type == "qwen3",
      layer_types=layer_types,
      sliding_window=(get("sliding_window", 4096) if SLIDING in layer_types else None),
      query_pre_attn_scalar=get("query_pre_attn_scalar", 256) if gemma else None,
      attn_logit_softcapping=get("attn_logit_softcapping", 50.0) if gemma else None,
      final_logit_softcapping=get("final_logit_softcapping", 30.0) if gemma else None,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_ids(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
  )


def _gpt2_from_hf(hf, where) -> PretrainedConfig:
  get = lambda name, *default: _field(hf, name, where, *default)
  if hf.get("scale_attn_by_inverse_layer_idx"):
    raise ConfigError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported.")
  if not hf.get("scale_attn_weights", True):
    raise ConfigError(f"{where}: scale_attn_weights=false is not supported.")
  hidden_size, num_heads = get("n_embd"), get("n_head")
  num_layers = get("n_layer")
  return PretrainedConfig(
      model_type="gpt2",
      vocab_size=get("vocab_size"),
      hidden_size=hidden_size,
      intermediate_size=get("n_inner", 4 * hidden_size),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_heads,
      head_dim=hidden_size // num_heads,
      max_position_embeddings=get("n_positions", 1024),
      norm_eps=float(get("layer_norm_epsilon", 1e-5)),
      activation=_activation(get("activation_function", "gelu_new"), where,
                             "activation_function"),
      tie_embeddings=bool(get("tie_word_embeddings", True)),
      qkv_bias=True, out_bias=True, mlp_bias=True,
      layer_types=(FULL,) * num_layers,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_ids(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
  )


def _special_ids(config):
  eos = config.eos_token_id
  return {"bos_token_id": config.bos_token_id,
          "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
          "pad_token_id": config.pad_token_id}


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gpt2": "GPT2LMHeadModel"}


def _decoder_to_hf(config: PretrainedConfig) -> Dict[str, Any]:
  hf = {
      "architectures": [_ARCHITECTURES[config.model_type]],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      "rope_parameters": dict(config.scaling, rope_theta=config.rope_theta,
                              rope_type=config.scaling.get("rope_type", "default")),
      "layer_types": list(config.layer_types),
      **_special_ids(config),
  }
  hf["hidden_activation" if config.model_type == "gemma2" else "hidden_act"] = config.activation
  if config.model_type == "qwen2":
    if config.qkv_bias is not True or config.out_bias or config.mlp_bias:
      raise ConfigError("save_pretrained: a qwen2 model has q/k/v biases and no others.")
  else:
    if config.qkv_bias != config.out_bias:
      raise ConfigError(f"save_pretrained: a {config.model_type} model has biases on all of "
                        "q/k/v/o or on none (attention_bias).")
    hf["attention_bias"] = config.qkv_bias
  if config.model_type == "llama":
    hf["mlp_bias"] = config.mlp_bias
  if SLIDING in config.layer_types:
    hf["sliding_window"] = config.sliding_window
    if config.model_type in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = True
      hf["max_window_layers"] = config.layer_types.index(SLIDING)
  if config.model_type == "gemma2":
    hf.update(query_pre_attn_scalar=config.query_pre_attn_scalar,
              attn_logit_softcapping=config.attn_logit_softcapping,
              final_logit_softcapping=config.final_logit_softcapping)
  return hf


def _gpt2_to_hf(config: PretrainedConfig) -> Dict[str, Any]:
  return {
      "architectures": [_ARCHITECTURES["gpt2"]],
      "model_type": "gpt2",
      "vocab_size": config.vocab_size,
      "n_embd": config.hidden_size,
      "n_inner": config.intermediate_size,
      "n_layer": config.num_layers,
      "n_head": config.num_heads,
      "n_positions": config.max_position_embeddings,
      "layer_norm_epsilon": config.norm_eps,
      "activation_function": config.activation,
      "tie_word_embeddings": config.tie_embeddings,
      **_special_ids(config),
  }


_TO_HF = {"llama": _decoder_to_hf, "qwen2": _decoder_to_hf, "qwen3": _decoder_to_hf,
          "gemma2": _decoder_to_hf, "gpt2": _gpt2_to_hf}
