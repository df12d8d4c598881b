"""Mixed precision as a wrapper around any apply function (the jmp policy, Micikevicius et al.
2018 "Mixed Precision Training"; bfloat16 needs no loss scaling).

    apply = mixed_precision(apply, 'bfloat16')
    output, new_model_state = apply(variables, inputs, train=True, rng=rng)

Parameters stay float32 in the train state. Inside the wrapped apply every floating variable
(params and model state such as BatchNorm statistics) and every floating input is cast to the
compute dtype, the model runs, and the Output's logits and features are cast back to float32,
so all loss math is float32 (DESIGN.md, Losses). The updated model state comes back in the
dtype its variables are stored in (float32 batch statistics stay float32; the running average
then reads its previous value rounded to bfloat16, an error of at most 2**-9 relative per step
that the momentum averages out). Gradients reach the float32 parameters through the casts
(the transpose of a cast is a cast back). Integer inputs (LM tokens), integer variables and
PRNG keys are untouched.

Works for every model: built-in, registered linen, NNX or hand-written functions. A linen layer
computes in the dtype of its inputs and parameters when its own `dtype` is None (flax's
default), so casting them is enough; the built-in models pin `dtype=float32`, so `model_fns`
also builds them with `dtype` set to the compute dtype (their attention softmax and returned
logits stay float32 by construction).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.models import registry
from kdjax.models.adapters import ModelFns
from kdjax.models.output import Output

# Config value -> dtype (`config.dtype`, `config.teacher.dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, *, field: str = "dtype") -> Any:
  """The jnp dtype of a config value ('float32' or 'bfloat16'); ValueError naming `field`."""
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r} is not a compute dtype; valid values: "
                     f"{', '.join(sorted(DTYPES))}.")
  return DTYPES[name]


def _is_floating(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def cast_floating(tree, dtype):
  """`tree` with every floating array cast to `dtype` (other leaves as they are)."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype) if _is_floating(x) else x, tree)


def _cast_like(new, stored):
  """`new` (updated model state) in the dtypes of `stored` where the trees match, else its
  floating leaves as float32."""
  try:
    return jax.tree.map(
        lambda n, s: jnp.asarray(n, s.dtype) if _is_floating(n) and _is_floating(s) else n,
        new, stored)
  except ValueError:  # A structure the variables do not have (a new collection).
    return cast_floating(new, jnp.float32)


def mixed_precision(apply, dtype):
  """`apply` computing in `dtype`, with float32 outputs and model state in its stored dtype.

  Args:
    apply: `apply(variables, inputs, *, train, rng) -> (Output, new_model_state)`.
    dtype: the compute dtype, a jnp dtype or its name ('float32', 'bfloat16').

  Returns:
    An apply function of the same signature. For float32 it is `apply` itself (bit-equal).
  """
  dtype = compute_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
  if dtype == jnp.float32:
    return apply

  def wrapped(variables, inputs, *, train: bool, rng=None):
    output, new_model_state = apply(cast_floating(variables, dtype),
                                    cast_floating(inputs, dtype), train=train, rng=rng)
    output = Output(cast_floating(output.logits, jnp.float32),
                    cast_floating(dict(output.features), jnp.float32))
    stored = {name: variables[name] for name in new_model_state if name in variables}
    if set(stored) == set(new_model_state):
      new_model_state = _cast_like(dict(new_model_state), stored)
    else:
      new_model_state = cast_floating(new_model_state, jnp.float32)
    return output, new_model_state

  # Attributes such as `apply.module` (the linen module, which `kdjax.lm.generate` uses for its
  # KV-cache path and length checks; built-in models carry the compute dtype themselves).
  wrapped.__dict__.update(getattr(apply, "__dict__", {}))
  return wrapped


def has_dtype_field(name: str, *, num_classes: int) -> bool:
  """True for a built-in linen model with a `dtype` attribute (its layers' compute dtype)."""
  if name not in registry.BUILT_IN:
    return False
  module = registry.get_model(name, num_classes=num_classes)
  return "dtype" in {field.name for field in dataclasses.fields(module)}


def dtype_kwargs(name: str, dtype, *, num_classes: int) -> dict:
  """`{'dtype': dtype}` for a built-in model that takes it and a non-float32 `dtype`, else {}."""
  dtype = compute_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
  if dtype == jnp.float32 or not has_dtype_field(name, num_classes=num_classes):
    return {}
  return {"dtype": dtype}


def model_fns(name: str, *, num_classes: int, dtype="float32", **kwargs) -> ModelFns:
  """`registry.get_model_fns(name, ...)` whose apply computes in `dtype` (float32 parameters
  from `init`, float32 outputs); for float32 exactly `get_model_fns`."""
  fns = registry.get_model_fns(name, num_classes=num_classes, **kwargs,
                               **dtype_kwargs(name, dtype, num_classes=num_classes))
  return ModelFns(fns.init, mixed_precision(fns.apply, dtype))
