"""Which parameters a 'model' mesh axis splits: rules on parameter paths, as plain data.

A rule is `(regex, candidates)`: the regex is searched in the parameter's path joined with '/'
(e.g. `params/blocks_0/attention/query/kernel`, or inside a train state
`opt_state/0/mu/student/blocks_0/attention/query/kernel`); the first rule that matches decides.
`candidates` are PartitionSpecs tried in order; the first whose sharded dimensions divide by
the 'model' axis size is used, and if none does (or no rule matches) the parameter is
replicated. Specs name the parameter's TRAILING dimensions, so the same rule fits a stacked
multi-teacher tree ([K, in, out]) and a plain one ([in, out]).

The split follows Megatron-LM's tensor parallelism (Shoeybi et al. 2019, "Megatron-LM:
Training Multi-Billion Parameter Language Models Using Model Parallelism", section 3):
- column-parallel, output features split: attention q/k/v (ViT's fused qkv) and the MLP's
  up/gate (ViT's fc1) kernels `[D_in, D_out]` -> `(None, 'model')`, and their biases;
  grouped-query key/value kernels `[D, K d]` split the same way when `K d` divides the axis
  (otherwise replicated), which need not align with heads: communication, not accuracy;
- row-parallel, input features split: the attention output (ViT's proj) and the MLP's down
  (ViT's fc2) kernels -> `('model', None)`; their biases are replicated (added once, after
  the partial sums are reduced);
- the token embedding `[V, D]` on the vocabulary when V divides the axis, else on the hidden
  axis (byte vocabularies of 259 tokens do not divide); an untied unembedding or a classifier
  head `[D, V]` on V (else on D);
- everything else (norm scales, row-parallel biases, patch and position embeddings, the class
  token, scalars) replicated.

Sharding never changes the numbers, only where they live: under `jax.jit` XLA inserts the
collectives that a layout needs (ViT's fused qkv split on 3D is not head-aligned, which costs
communication, not accuracy).
"""

import re
from typing import Any, Sequence, Tuple, Union

import jax
from jax.sharding import PartitionSpec

MODEL_AXIS = "model"

_COLUMN = PartitionSpec(None, MODEL_AXIS)
_ROW = PartitionSpec(MODEL_AXIS, None)
_VECTOR = PartitionSpec(MODEL_AXIS)

Candidates = Union[PartitionSpec, Sequence[PartitionSpec]]

# TransformerLM (kdjax/models/transformer.py) and VisionTransformer (kdjax/models/vit.py).
TRANSFORMER_RULES: Tuple[Tuple[str, Candidates], ...] = (
    # TransformerLM: CausalSelfAttention's query/key/value/out, Block's SwiGLU gate/up/down.
    # Also the pretrained families (kdjax/models/pretrained: Llama, Qwen, Gemma 2, GPT-2), which
    # use the same names, with MLPs under `mlp/` and column-parallel biases (Qwen2, GPT-2).
    (r"attention/(query|key|value)/kernel$", _COLUMN),
    (r"attention/(query|key|value)/bias$", _VECTOR),
    (r"attention/out/kernel$", _ROW),
    (r"/(gate|up)/kernel$", _COLUMN),
    (r"/(gate|up)/bias$", _VECTOR),
    (r"/down/kernel$", _ROW),
    (r"(^|/)embed/embedding$", (_ROW, _COLUMN)),
    (r"(^|/)unembed/kernel$", (_COLUMN, _ROW)),
    # VisionTransformer: SelfAttention's fused qkv and proj, Block's fc1/fc2, the head.
    (r"attn/qkv/kernel$", _COLUMN),
    (r"attn/qkv/bias$", _VECTOR),
    (r"attn/proj/kernel$", _ROW),
    (r"/fc1/kernel$", _COLUMN),
    (r"/fc1/bias$", _VECTOR),
    (r"/fc2/kernel$", _ROW),
    (r"(^|/)head/kernel$", (_COLUMN, _ROW)),
    (r"(^|/)head/bias$", _VECTOR),
)


def path_name(path) -> str:
  """A pytree key path as 'a/b/c' (dict keys, dataclass fields and sequence indices)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _fits(spec: PartitionSpec, shape: Tuple[int, ...], axis_size: int) -> bool:
  if len(spec) > len(shape):
    return False
  trailing = shape[len(shape) - len(spec):]
  return all(name is None or size % axis_size == 0 for name, size in zip(spec, trailing))


def spec_for(name: str, shape: Sequence[int], axis_size: int,
             rules=TRANSFORMER_RULES) -> PartitionSpec:
  """The PartitionSpec of the parameter at path `name` with `shape` (full rank).

  Args:
    name: the '/'-joined path.
    shape: the parameter's shape.
    axis_size: the size of the 'model' mesh axis.
    rules: `(regex, candidates)` pairs, first match wins (see the module docstring).

  Returns:
    A spec of len(shape) entries (leading dimensions None), or `PartitionSpec()` (replicated)
    when no rule matches or no candidate divides.
  """
  shape = tuple(shape)
  for pattern, candidates in rules:
    if not re.search(pattern, name):
      continue
    if isinstance(candidates, PartitionSpec):
      candidates = (candidates,)
    for spec in candidates:
      if _fits(spec, shape, axis_size):
        return PartitionSpec(*((None,) * (len(shape) - len(spec)) + tuple(spec)))
    return PartitionSpec()
  return PartitionSpec()


def partition_specs(tree: Any, axis_size: int, rules=TRANSFORMER_RULES) -> Any:
  """A tree of PartitionSpecs, one per leaf of `tree` (arrays or ShapeDtypeStructs).

  With `axis_size` 1 every leaf is replicated (nothing to split).
  """
  def leaf_spec(path, leaf):
    shape = getattr(leaf, "shape", ())
    if axis_size <= 1 or not shape:
      return PartitionSpec()
    return spec_for(path_name(path), shape, axis_size, rules)
  return jax.tree_util.tree_map_with_path(leaf_spec, tree)
