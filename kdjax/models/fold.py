"""Frozen-teacher fast path: BatchNorm folded into the preceding convolution.

An eval-mode BatchNorm is a per-channel affine map, `y = (x - mean) * s + beta`
with `s = gamma / sqrt(var + eps)`; when `x` is a convolution's output,
`conv(x, K) * s = conv(x, K * s)`, so the teacher can run the convolution with
kernel `K * s` and bias `(b - mean) * s + beta` and skip the BatchNorm.

Route chosen: method interception (`flax.linen.intercept_methods`), not a model
attribute. One abstract trace (`jax.eval_shape`, nothing computed) records which
`nn.BatchNorm` call consumes exactly the array a `nn.Conv` call returned; the
variables are transformed once; the returned apply function re-runs the
unchanged module with interceptors that add the folded bias after those convs
and turn their BatchNorms into identities (a BatchNorm not fed by a conv, e.g.
WRN's pre-activation ones, becomes a precomputed per-channel affine). This
works for every linen CNN in `kdjax.models` (cifar_resnet incl. resnet8x4 /
resnet32x4, wrn, vgg, mobilenet, shufflenet, imagenet_resnet) without touching
the model files, and for registered user models too.

Optionally the teacher computes in bfloat16 (`dtype=jnp.bfloat16`): folded
variables are cast and the module is cloned with `dtype` (its logits stay
float32, as every kdjax model returns them).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

__all__ = ["fold_batch_norm", "fold_model"]

FOLDED = "folded_batch_norm"  # the variable collection holding biases/affines


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _discover(module: nn.Module, variables, sample_inputs):
  """(conv path -> bn path, bn path -> module) from one abstract eval trace."""
  conv_outputs = {}  # id(output array) -> conv path
  keep_alive = []
  pairs, batch_norms = {}, {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    mod = context.module
    path = tuple(mod.scope.path)
    if isinstance(mod, nn.Conv):
      conv_outputs[id(out)] = path
      keep_alive.append(out)
    elif isinstance(mod, nn.BatchNorm):
      if mod.axis not in (-1,) or not mod.use_running_average:
        raise ValueError(
            f"fold_batch_norm: BatchNorm {'/'.join(path)} must normalise the "
            f"last axis in eval mode (axis=-1, use_running_average=True), got "
            f"axis={mod.axis}")
      batch_norms[path] = mod
      source = conv_outputs.get(id(args[0]))
      if source is not None and source not in pairs:
        pairs[source] = path
    return out

  def run(v, x):
    with nn.intercept_methods(record):
      return module.apply(v, x, train=False)

  jax.eval_shape(run, variables, sample_inputs)
  del keep_alive
  return pairs, batch_norms


def fold_batch_norm(module: nn.Module, variables: Dict[str, Any],
                    sample_inputs: Any, *, dtype: Optional[Any] = None):
  """Folds an eval-mode CNN's BatchNorms into its convolutions.

  Args:
    module: a linen module returning `Output` (e.g. `get_model('resnet32x4',
      num_classes=100)`), whose `__call__` takes `(inputs, *, train)`.
    variables: its variables (`params` and `batch_stats`), e.g. a teacher's.
    sample_inputs: an input batch (or `jax.ShapeDtypeStruct`) of the shape the
      teacher will see; only its shape is used.
    dtype: optional compute dtype for the teacher (e.g. `jnp.bfloat16`):
      variables are cast to it and the module is cloned with `dtype=dtype`.

  Returns:
    `(apply, folded_variables)`; `apply(folded_variables, inputs, *,
    train=False, rng=None) -> (Output, {})` is an eval-only apply function
    (see `kdjax.models.apply_fn`) whose outputs equal the original module's in
    eval mode up to float rounding.
  """
  variables = flax.core.unfreeze(variables)
  if "params" not in variables:
    raise ValueError(f"fold_batch_norm: variables need a 'params' collection, "
                     f"got {sorted(variables)}")
  pairs, batch_norms = _discover(module, variables, sample_inputs)
  params = jax.tree.map(lambda x: x, variables["params"])
  stats = variables.get("batch_stats", {})
  folded: Dict[str, Any] = {}

  def put(tree, path, value):
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = value

  def affine(bn_path):
    bn = batch_norms[bn_path]
    bn_params = _get(params, bn_path) if bn.use_scale or bn.use_bias else {}
    bn_stats = _get(stats, bn_path)
    mean = bn_stats["mean"].astype(jnp.float32)
    var = bn_stats["var"].astype(jnp.float32)
    scale = jax.lax.rsqrt(var + bn.epsilon)
    if bn.use_scale:
      scale = scale * bn_params["scale"].astype(jnp.float32)
    shift = -mean * scale
    if bn.use_bias:
      shift = shift + bn_params["bias"].astype(jnp.float32)
    return scale, shift

  folded_bns = set(pairs.values())
  for conv_path, bn_path in pairs.items():
    scale, shift = affine(bn_path)
    conv_params = _get(params, conv_path)
    kernel = conv_params["kernel"]
    # Output channels are the kernel's last axis (also for grouped convs).
    conv_params["kernel"] = (kernel.astype(jnp.float32) * scale).astype(
        kernel.dtype)
    bias = shift
    if "bias" in conv_params:
      bias = conv_params.pop("bias").astype(jnp.float32) * scale + shift
    put(folded, conv_path, {"bias": bias})
  for bn_path in batch_norms:
    if bn_path not in folded_bns:
      scale, shift = affine(bn_path)
      put(folded, bn_path, {"scale": scale, "shift": shift})
  for bn_path in batch_norms:  # the BatchNorms are never called any more
    parent = _get(params, bn_path[:-1]) if bn_path[:-1] else params
    parent.pop(bn_path[-1], None)

  # A conv whose bias moved to FOLDED must not look for its own bias param.
  biased = {p for p in pairs if "bias" in _get(variables["params"], p)}
  folded_variables = {"params": params, FOLDED: folded}
  if dtype is not None:
    folded_variables = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
        else x, folded_variables)
    module = module.clone(dtype=dtype)

  def intercept(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    mod = context.module
    path = tuple(mod.scope.path)
    if isinstance(mod, nn.Conv) and path in pairs:
      if path in biased:  # its own bias param is gone: run it bias-free
        kernel = mod.get_variable("params", "kernel")
        out = mod.clone(use_bias=False, parent=None).apply(
            {"params": {"kernel": kernel}}, *args)
      else:
        out = next_fun(*args, **kwargs)
      bias = mod.get_variable(FOLDED, "bias")
      return out + bias.astype(out.dtype)
    if isinstance(mod, nn.BatchNorm):
      x = args[0]
      if path in folded_bns:
        return x
      scale = mod.get_variable(FOLDED, "scale").astype(x.dtype)
      shift = mod.get_variable(FOLDED, "shift").astype(x.dtype)
      return x * scale + shift
    return next_fun(*args, **kwargs)

  def apply(folded_vars, inputs, *, train: bool = False,
            rng: Optional[jax.Array] = None) -> Tuple[Output, dict]:
    del rng
    if train:
      raise ValueError("fold_batch_norm: the folded teacher is eval-only; "
                       "call apply(..., train=False)")
    if dtype is not None:
      inputs = inputs.astype(dtype)
    with nn.intercept_methods(intercept):
      out = module.apply(folded_vars, inputs, train=False)
    return out, {}

  return apply, folded_variables


def fold_model(name: str, variables: Dict[str, Any], sample_inputs: Any, *,
               num_classes: int, **model_kwargs):
  """`fold_batch_norm` for the model registered as `name` (`config.teacher.fold_batch_norm`).

  Args:
    name: a linen model of `kdjax.models` (built-in or registered) that has BatchNorms.
    variables: its trained variables, with `params` and `batch_stats`.
    sample_inputs: a batch (or its shapes) like the ones the teacher will see.
    num_classes: as the model was built.
    **model_kwargs: more arguments of its factory (e.g. `dtype=jnp.bfloat16`).

  Returns:
    `(apply, folded_variables)` as `fold_batch_norm`.

  Raises:
    ValueError: in one line, when `name` is not a linen model or has no `batch_stats`.
  """
  from kdjax.models import registry  # pylint: disable=g-import-not-at-top
  if "batch_stats" not in variables:
    raise ValueError(f"fold_batch_norm: model {name!r} has no BatchNorm statistics "
                     f"(variables: {sorted(variables)}); folding needs a linen model with "
                     "BatchNorm, e.g. resnet32x4, wrn_40_2 or vgg13.")
  try:
    module = registry.get_model(name, num_classes=num_classes, **model_kwargs)
  except TypeError:
    raise ValueError(f"fold_batch_norm: model {name!r} is not a linen module (NNX or plain "
                     "functions); only linen models with BatchNorm can be folded.") from None
  return fold_batch_norm(module, variables, sample_inputs)
