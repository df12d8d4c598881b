"""Which transformers tensor is which Flax parameter: a list of `Entry`, and the two conversions.

An entry names one tensor of the checkpoint (name and shape) and the parameter path(s) it
becomes, with one of three layouts:
  copy       the same array (embeddings, norm scales, biases, GPT-2's Conv1D kernels, which
             transformers stores [in, out] like Flax);
  transpose  torch `nn.Linear.weight` [out, in] -> Flax `Dense.kernel` [in, out];
  split      one tensor cut into equal parts along its last axis (GPT-2's fused `c_attn`
             [D, 3D] -> query, key, value kernels [D, D]; its bias likewise).
Checking names and shapes against the entries happens in `checkpoint.py`, once for all
families.
"""

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

from kdjax.models.pretrained.config import PretrainedConfig

COPY, TRANSPOSE, SPLIT = "copy", "transpose", "split"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: its name, its [shape] in the checkpoint, its parameter paths."""
  name: str
  shape: Tuple[int, ...]
  paths: Tuple[str, ...]
  layout: str = COPY


Mapping = List[Entry]


def copy(name: str, path: str, shape) -> Entry:
  return Entry(name, tuple(shape), (path,), COPY)


def linear(prefix: str, path: str, in_features: int, out_features: int,
           bias: bool) -> List[Entry]:
  """A torch `nn.Linear` `prefix.weight` [out, in] (and `prefix.bias` [out])."""
  entries = [Entry(f"{prefix}.weight", (out_features, in_features), (f"{path}/kernel",),
                   TRANSPOSE)]
  if bias:
    entries.append(copy(f"{prefix}.bias", f"{path}/bias", (out_features,)))
  return entries


def decoder_layer(config: PretrainedConfig, i: int, norms: Dict[str, str]) -> List[Entry]:
  """Layer i of a Llama / Qwen / Gemma decoder; `norms` maps its norm names to kdjax's."""
  d, heads, kv_heads = config.head_dim, config.num_heads, config.num_kv_heads
  hidden, mlp = config.hidden_size, config.intermediate_size
  layer, block = f"model.layers.{i}", f"blocks_{i}"
  entries = [copy(f"{layer}.{hf}.weight", f"{block}/{ours}/scale", (hidden,))
             for hf, ours in norms.items()]
  for hf, ours, width in (("q", "query", heads * d), ("k", "key", kv_heads * d),
                          ("v", "value", kv_heads * d)):
    entries += linear(f"{layer}.self_attn.{hf}_proj", f"{block}/attention/{ours}", hidden,
                      width, config.qkv_bias)
  entries += linear(f"{layer}.self_attn.o_proj", f"{block}/attention/out", heads * d, hidden,
                    config.out_bias)
  if config.qk_norm:
    entries += [copy(f"{layer}.self_attn.q_norm.weight", f"{block}/attention/query_norm/scale",
                     (d,)),
                copy(f"{layer}.self_attn.k_norm.weight", f"{block}/attention/key_norm/scale",
                     (d,))]
  for name, width_in, width_out in (("gate", hidden, mlp), ("up", hidden, mlp),
                                    ("down", mlp, hidden)):
    entries += linear(f"{layer}.mlp.{name}_proj", f"{block}/mlp/{name}", width_in, width_out,
                      config.mlp_bias)
  return entries


def lm_head(config: PretrainedConfig) -> List[Entry]:
  """`lm_head.weight` [V, D] when the unembedding is not tied to the embedding."""
  if config.tie_embeddings:
    return []
  return linear("lm_head", "unembed", config.hidden_size, config.vocab_size, False)


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def to_params(entries: Mapping, tensors: Dict[str, np.ndarray]) -> dict:
  """Checkpoint tensors (already checked against `entries`) -> a nested params dict."""
  params = {}
  for entry in entries:
    tensor = tensors[entry.name]
    if entry.layout == TRANSPOSE:
      tensor = tensor.T
    parts = (np.split(tensor, len(entry.paths), axis=-1) if entry.layout == SPLIT
             else [tensor])
    for path, part in zip(entry.paths, parts):
      _set(params, path, np.ascontiguousarray(part))
  return params


def from_params(entries: Mapping, params) -> Dict[str, np.ndarray]:
  """A nested params dict -> checkpoint tensors (numpy, contiguous)."""
  tensors = {}
  for entry in entries:
    parts = [np.asarray(_get(params, path)) for path in entry.paths]
    tensor = np.concatenate(parts, axis=-1) if entry.layout == SPLIT else parts[0]
    if entry.layout == TRANSPOSE:
      tensor = tensor.T
    tensors[entry.name] = np.ascontiguousarray(tensor)
  return tensors


def param_shapes(entries: Mapping) -> Dict[str, Tuple[int, ...]]:
  """Parameter path -> the shape the module expects."""
  shapes = {}
  for entry in entries:
    shape = entry.shape[::-1] if entry.layout == TRANSPOSE else entry.shape
    if entry.layout == SPLIT:
      shape = shape[:-1] + (shape[-1] // len(entry.paths),)
    for path in entry.paths:
      shapes[path] = shape
  return shapes
