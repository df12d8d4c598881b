"""Safetensors checkpoints in and out, checked tensor by tensor against the architecture.

Reads `model.safetensors`, or the shards listed in `model.safetensors.index.json`, with the
`safetensors` package's numpy API (no torch; bfloat16 arrives as `ml_dtypes.bfloat16`), and
writes one `model.safetensors` with the `{"format": "pt"}` metadata that transformers asks
for. Every tensor the architecture needs must be present with its shape, and every tensor in
the files must be one of them; each failure is one line naming the tensor (and the shapes).

Tolerated extras, which transformers itself ignores: `lm_head.weight` when the embeddings are
tied (it is re-tied to the embedding on load), RoPE `rotary_emb.inv_freq` buffers, and GPT-2's
`attn.bias` / `attn.masked_bias` causal-mask buffers. GPT-2 names without the `transformer.`
prefix (older checkpoints) are read as if they had it.
"""

import json
import os
import re
from typing import Dict, List

import numpy as np

from kdjax.models.pretrained import names
from kdjax.models.pretrained.config import PretrainedConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def checkpoint_files(directory: str) -> List[str]:
  """The safetensors files of a checkpoint directory (the index's shards, or the single file)."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path}: no 'weight_map' of tensor name -> shard file.")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.exists(os.path.join(directory, name)):
        raise ValueError(f"{index_path}: lists shard {name!r}, which is not in {directory}.")
    return [os.path.join(directory, name) for name in files]
  if os.path.exists(os.path.join(directory, SINGLE_FILE)):
    return [os.path.join(directory, SINGLE_FILE)]
  found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(directory, found[0])]
  if found:
    raise ValueError(f"{directory}: {len(found)} .safetensors files ({', '.join(found[:3])}, ...) "
                     f"and no {INDEX_FILE} saying which tensors they hold.")
  raise ValueError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                   "are read; convert pytorch_model.bin with transformers' save_pretrained).")


def _canonical(name: str, config: PretrainedConfig) -> str:
  if config.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
    return "transformer." + name
  return name


def read_tensors(directory: str, config: PretrainedConfig,
                 entries: names.Mapping) -> Dict[str, np.ndarray]:
  """name -> numpy array for every entry, after checking names and shapes (one-line errors)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  expected = {entry.name: entry.shape for entry in entries}
  tensors, origin = {}, {}
  for path in checkpoint_files(directory):
    with safe_open(path, framework="numpy") as f:
      for stored_name in f.keys():
        name = _canonical(stored_name, config)
        tied_head = name == "lm_head.weight" and config.tie_embeddings
        if tied_head or _IGNORED.search(name):
          continue
        shape = tuple(f.get_slice(stored_name).get_shape())
        if name not in expected:
          raise ValueError(f"{path}: unexpected tensor {stored_name!r} of shape {shape} (not "
                           f"part of a {config.model_type} model with {config.num_layers} "
                           "layers as config.json describes).")
        if name in tensors:
          raise ValueError(f"{path}: tensor {stored_name!r} is also in {origin[name]}.")
        if shape != expected[name]:
          raise ValueError(f"{path}: tensor {stored_name!r} has shape {shape}, config.json "
                           f"implies {expected[name]}.")
        tensors[name], origin[name] = f.get_tensor(stored_name), path
  missing = [name for name in expected if name not in tensors]
  if missing:
    raise ValueError(f"{directory}: the checkpoint has no tensor {missing[0]!r} (shape "
                     f"{expected[missing[0]]}){f' and {len(missing) - 1} more' if missing[1:] else ''}"
                     f"; config.json describes a {config.model_type} model with "
                     f"{config.num_layers} layers.")
  return tensors


def check_params(params, entries: names.Mapping, where: str) -> None:
  """Refuses a params tree whose paths or shapes differ from the architecture's (one line)."""
  import jax  # pylint: disable=g-import-not-at-top
  expected = names.param_shapes(entries)
  got = {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(np.shape(leaf))
         for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  for path, shape in expected.items():
    if path not in got:
      raise ValueError(f"{where}: params have no {path!r} (shape {shape}).")
    if got[path] != shape:
      raise ValueError(f"{where}: params {path!r} has shape {got[path]}, the config implies "
                       f"{shape}.")
  extra = sorted(set(got) - set(expected))
  if extra:
    raise ValueError(f"{where}: params {extra[0]!r} is not part of the config's model (no "
                     "checkpoint tensor maps to it).")


def write_tensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
  """One safetensors file with transformers' `{"format": "pt"}` metadata."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tensors, path, metadata={"format": "pt"})
