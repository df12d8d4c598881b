"""Models by name: `get_model_fns(name, num_classes=..., **kwargs)` returns `ModelFns`.

Each model family module (`cifar_resnet`, `wrn`, ...) declares its own `MODELS` table of
`ModelEntry`s; this file only collects them, so adding a family touches one line here.
`register(name, ...)` adds a user's linen or NNX model, or plain functions, under a name a
config can use (`config.student.model`, `config.teacher.model`); it must run in the Python
process that trains (and in the one that loads the run), before `train_and_evaluate` /
`run_suite`. `get_model(name, ...)` still returns the linen module of a linen model.
"""

import inspect
import re
from typing import Any, Callable, Dict, List, NamedTuple

import flax.linen as nn

from kdjax.diffusion import denoiser_model
from kdjax.models import (adapters, cifar_resnet, imagenet_resnet, mnist1d, mobilenet, shufflenet,
                          transformer, vgg, vit, wrn)
from kdjax.models.adapters import ModelFns


class ModelEntry(NamedTuple):
  """A model family member: its factory and what it takes.

  Attributes:
    factory: `(num_classes=..., **kwargs) -> nn.Module` for the built-in models; a registered
      model's factory may also build an NNX module or `ModelFns`, or be `ModelFns` itself
      (see `register`).
    input_kind: 'signal1d', 'image32', 'image224' or 'tokens' (int32 token ids [B, T] of a
      language model, whose `num_classes` is the vocabulary size); checked against the
      dataset's.
    uses_batch_norm: the factory accepts `batch_norm_axis_name` (needed under pmap).
  """
  factory: Any
  input_kind: str = "image32"
  uses_batch_norm: bool = True


_FAMILIES = (mnist1d, cifar_resnet, wrn, vgg, mobilenet, shufflenet, imagenet_resnet, vit,
             transformer, denoiser_model)

ENTRIES: Dict[str, ModelEntry] = {}
for _family in _FAMILIES:
  for _name, _entry in _family.MODELS.items():
    assert _name not in ENTRIES, f"model {_name!r} is defined twice"
    ENTRIES[_name] = ModelEntry(*_entry)

BUILT_IN = frozenset(ENTRIES)
# Name -> factory; `register` adds to (and `replace=True` changes) these same objects.
MODELS: Dict[str, Any] = {n: e.factory for n, e in ENTRIES.items()}

# Which models use BatchNorm and so accept `batch_norm_axis_name` (needed under pmap).
USES_BATCH_NORM = {n for n, e in ENTRIES.items() if e.uses_batch_norm}

# Called after every (un)registration: caches keyed by model name (shape checks) drop theirs.
ON_CHANGE: List[Callable[[], Any]] = []


def model_input_kind(name: str) -> str:
  return _entry(name).input_kind


def _entry(name: str) -> ModelEntry:
  if name not in ENTRIES:
    raise ValueError(f"Unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}. "
                     "A model of your own must be registered first (kdjax.models.register).")
  return ENTRIES[name]


def register(name: str, factory_or_fns, *, input_kind: str, uses_batch_norm: bool = False,
             replace: bool = False) -> None:
  """Makes a model of your own available by name to configs, suites and `kdjax.load_run`.

  Args:
    name: the name a config gives in `config.student.model` / `config.teacher.model`.
    factory_or_fns: one of
      * `factory(num_classes=..., **kwargs)` returning a linen module (its `__call__` takes
        `(inputs, *, train)`), `ModelFns`, or an NNX module;
      * an NNX constructor: an `nnx.Module` subclass or a function that takes `rngs` (and
        `num_classes`), called as `factory(num_classes=..., rngs=nnx.Rngs(rng))` at init so
        that each seed initialises differently;
      * `ModelFns` (e.g. `adapters.from_functions(init, apply)`), used as given whatever
        `config.num_classes` is;
      * a linen module instance.
      The model returns `Output(logits, features)` or bare logits; see `adapters` for taps.
    input_kind: the kind of inputs it takes ('signal1d', 'image32', 'image224', or the kind
      given to `kdjax.data.register_arrays`); a config pairs it only with datasets of that kind.
    uses_batch_norm: the factory accepts `batch_norm_axis_name` (set under pmap so that
      BatchNorm statistics are computed over the global batch).
    replace: allow replacing an earlier registration of `name` (never a built-in model).

  Raises:
    ValueError: the name is taken (without `replace`), or an argument is not one of the above.
  """
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
    raise ValueError(f"register: name must be a non-empty string of letters, digits, '_', '.' "
                     f"or '-' (it is used in configs and ':'/','-separated fields); got {name!r}.")
  if name in BUILT_IN:
    raise ValueError(f"register: {name!r} is a built-in model and cannot be replaced; choose "
                     "another name.")
  if name in ENTRIES and not replace:
    raise ValueError(f"register: model {name!r} is already registered; pass replace=True to "
                     "replace it.")
  if not isinstance(input_kind, str) or not input_kind:
    raise ValueError(f"register: input_kind must be a non-empty string such as 'signal1d', "
                     f"'image32' or 'image224'; got {input_kind!r}.")
  is_fixed = isinstance(factory_or_fns, (ModelFns, nn.Module)) or adapters.is_nnx_module(
      factory_or_fns)
  if not is_fixed and not callable(factory_or_fns):
    raise ValueError(f"register: {name!r} must be given a factory(num_classes=...), an NNX "
                     f"constructor, ModelFns or a linen module; got "
                     f"{type(factory_or_fns).__name__}.")
  if is_fixed and uses_batch_norm:
    raise ValueError(f"register: uses_batch_norm=True needs a factory that accepts "
                     f"batch_norm_axis_name; {name!r} was given a fixed "
                     f"{type(factory_or_fns).__name__}.")
  ENTRIES[name] = ModelEntry(factory_or_fns, input_kind, bool(uses_batch_norm))
  MODELS[name] = factory_or_fns
  USES_BATCH_NORM.discard(name)
  if uses_batch_norm:
    USES_BATCH_NORM.add(name)
  for hook in ON_CHANGE:
    hook()


def unregister(name: str) -> None:
  """Removes a registered model (tests, notebooks re-run cell by cell)."""
  if name in BUILT_IN:
    raise ValueError(f"unregister: {name!r} is a built-in model.")
  ENTRIES.pop(name, None)
  MODELS.pop(name, None)
  USES_BATCH_NORM.discard(name)
  for hook in ON_CHANGE:
    hook()


def _is_nnx_constructor(factory) -> bool:
  if isinstance(factory, type):
    return adapters.is_nnx_module_class(factory)
  try:
    return "rngs" in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return False


# (name, num_classes, kwargs) -> ModelFns of registered models: the runs of a suite share
# their jitted init / apply and so compile them once. Emptied on every (un)registration.
_REGISTERED_FNS: Dict[tuple, ModelFns] = {}
ON_CHANGE.append(_REGISTERED_FNS.clear)


def get_model_fns(name: str, *, num_classes: int, **kwargs) -> ModelFns:
  """The model `name` as `ModelFns(init, apply)`: the one way runs, teachers and
  `kdjax.load_run` build models, built-in or registered."""
  if name in BUILT_IN:
    return _model_fns(name, num_classes=num_classes, **kwargs)
  try:
    key = (name, num_classes, tuple(sorted(kwargs.items())))
    hash(key)
  except TypeError:  # Unhashable keyword values: built each time.
    return _model_fns(name, num_classes=num_classes, **kwargs)
  if key not in _REGISTERED_FNS:
    _REGISTERED_FNS[key] = _model_fns(name, num_classes=num_classes, **kwargs)
  return _REGISTERED_FNS[key]


def _model_fns(name: str, *, num_classes: int, **kwargs) -> ModelFns:
  factory = _entry(name).factory
  if isinstance(factory, ModelFns) or isinstance(factory, nn.Module) or \
      adapters.is_nnx_module(factory):
    if kwargs:
      raise ValueError(f"Model {name!r} was registered as a fixed "
                       f"{type(factory).__name__}; it takes no arguments, got {sorted(kwargs)}.")
    return adapters.to_model_fns(factory)
  if _is_nnx_constructor(factory):
    return adapters.from_nnx(
        lambda rngs: factory(num_classes=num_classes, rngs=rngs, **kwargs))
  return adapters.to_model_fns(factory(num_classes=num_classes, **kwargs))


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """The linen module of a built-in (or registered linen) model; `get_model_fns` works for
  every model."""
  factory = _entry(name).factory
  module = factory if isinstance(factory, nn.Module) else (
      None if isinstance(factory, ModelFns) or _is_nnx_constructor(factory) or
      adapters.is_nnx_module(factory) else factory(num_classes=num_classes, **kwargs))
  if not isinstance(module, nn.Module):
    raise TypeError(f"Model {name!r} is not a linen module (registered as NNX or plain "
                    "functions); use kdjax.models.get_model_fns(name, num_classes=...) instead.")
  return module
