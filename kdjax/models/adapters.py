"""Models as an (init, apply) pair, whatever they are written in: linen, NNX or plain functions.

    fns = from_linen(module) | from_nnx(make_model) | from_functions(init, apply)
    variables = fns.init(rng, sample_inputs)                 # {'params': ..., **model_state}
    output, new_model_state = fns.apply(variables, inputs, train=True, rng=rng)

`variables` is a pytree of arrays only (nested dicts with string keys), so it is checkpointed,
sharded and donated like any other; `new_model_state` holds the updated non-parameter
collections (BatchNorm statistics) in training mode and is `{}` otherwise. The train step,
the teachers and `kdjax.load_run` see nothing but these two functions.

Outputs. A model may return `Output(logits, features)` or bare logits (`[B, C]`, or `[B, T, V]`
for a language model); bare logits become `Output(logits, features)` with the features the
model sowed (below), so `features['embedding']` exists only if the model provides it. Logit
methods (kd, dkd, dist, ...) need logits only; feature methods name taps that must exist.

Intermediate features (taps) are exposed by returning them, or by sowing them:

  * linen: return `Output(logits, {'embedding': h, 'block1': b1})`, or call
    `self.sow('intermediates', 'block1', b1)`: every sown value appears in `features` under its
    module path joined by '/' (`'encoder/block1'`; the last value if sown several times).
  * NNX: return `Output(...)` likewise, or `self.sow(nnx.Intermediate, 'block1', b1)`: captured
    with `nnx.capture` around the call and added to `features` the same way.

Example, an NNX MLP with its embedding as a tap::

    class MLP(nnx.Module):
      def __init__(self, num_classes, *, rngs):
        self.hidden = nnx.Linear(40, 64, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

      def __call__(self, x):
        h = nnx.relu(self.hidden(x))
        self.sow(nnx.Intermediate, 'embedding', h)   # or: return Output(self.head(h), {...})
        return self.head(h)

    fns = from_nnx(lambda rngs: MLP(10, rngs=rngs))
    variables = fns.init(jax.random.key(0), np.zeros((2, 40), np.float32))
    output, _ = fns.apply(variables, x, train=False)   # output.features['embedding']: [B, 64]
"""

import inspect
import re
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

# linen's collection for `Module.sow`; never part of a model's variables.
INTERMEDIATES = "intermediates"


class ModelFns(NamedTuple):
  """A model as two pure functions.

  Attributes:
    init: `(rng, sample_inputs [B, ...]) -> variables`, `{'params': ..., **model_state}`.
    apply: `(variables, inputs, *, train: bool, rng=None) -> (Output, new_model_state)`.
  """
  init: Callable[..., dict]
  apply: Callable[..., tuple]


def as_output(result, sown: Optional[dict] = None) -> Output:
  """`result` (an `Output` or bare logits) as an `Output`, with the `sown` taps added (a tap
  the model returned wins over a sown one of the same name)."""
  sown = sown or {}
  if isinstance(result, Output):
    return Output(result.logits, {**sown, **dict(result.features)}) if sown else result
  if isinstance(result, (tuple, list, dict)):
    raise TypeError(f"A model must return an Output(logits, features) or a logits array; got a "
                    f"{type(result).__name__}.")
  return Output(result, dict(sown))


def _flatten_sown(tree, prefix: str = "") -> dict:
  """{'encoder': {'block1': (x,)}} -> {'encoder/block1': x} (the last value sown)."""
  taps = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      taps.update(_flatten_sown(value, name + "/"))
    else:
      taps[name] = value[-1] if isinstance(value, (tuple, list)) else value
  return taps


# -- linen ------------------------------------------------------------------------------------


def linen_apply(module: nn.Module):
  """The pure apply function of a linen module whose `__call__` takes `(inputs, *, train)`.

  Mutable collections (BatchNorm's `batch_stats`) are updated in training mode only; dropout
  draws from `rng`; values sown into 'intermediates' become taps.
  """

  def apply(variables, inputs, *, train: bool, rng: Optional[jax.Array] = None):
    model_state_names = [name for name in variables if name != "params"]
    rngs = {"dropout": rng} if rng is not None else None
    mutable = ([*model_state_names] if train else []) + [INTERMEDIATES]
    result, new_state = module.apply(variables, inputs, train=train, rngs=rngs, mutable=mutable)
    new_state = dict(new_state)
    output = as_output(result, _flatten_sown(dict(new_state.pop(INTERMEDIATES, {}))))
    return output, (new_state if train else {})

  apply.module = module  # For introspection (parameter counts, repr); the step never uses it.
  return apply


def linen_init(module: nn.Module, rng: jax.Array, sample_inputs) -> dict:
  """A linen module's variables from a sample batch (train=False shapes); sown values are
  outputs, not variables, and are dropped."""
  variables = dict(module.init({"params": rng, "dropout": rng}, sample_inputs, train=False))
  variables.pop(INTERMEDIATES, None)
  return variables


def from_linen(module: nn.Module) -> ModelFns:
  """A linen module (its `__call__(inputs, *, train)` returning `Output` or logits) as
  `ModelFns`."""
  if not isinstance(module, nn.Module):
    raise TypeError(f"from_linen takes a flax.linen Module; got {type(module).__name__}.")
  return ModelFns(init=lambda rng, sample_inputs: linen_init(module, rng, sample_inputs),
                  apply=linen_apply(module))


# -- NNX --------------------------------------------------------------------------------------


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def is_nnx_module(value) -> bool:
  return isinstance(value, _nnx().Module)


def is_nnx_module_class(value) -> bool:
  return isinstance(value, type) and issubclass(value, _nnx().Module)


def _collection_name(variable_type) -> str:
  """NNX variable type -> the linen-style collection it is kept under (BatchStat ->
  'batch_stats'); unregistered types by their snake_cased class name."""
  from flax.nnx import variablelib  # pylint: disable=g-import-not-at-top
  try:
    return variablelib.variable_name_from_type(variable_type)
  except ValueError:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", variable_type.__name__).lower()


def _str_keys(tree):
  """Pure-dict keys as strings (NNX lists give int keys; checkpoints store strings)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _like(template, tree):
  """`tree` (string keys) with the keys of the pure dict `template` (int keys where NNX has
  them)."""
  if isinstance(template, dict):
    return {k: _like(v, tree[str(k)]) for k, v in template.items()}
  return tree


def _random_key(rng: Optional[jax.Array]) -> jax.Array:
  if rng is None:
    return jax.random.key(0)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


class _NnxLayout:
  """An NNX model's graph definition and the abstract state of each part: params, RNG
  streams, and one collection per other variable type. Found once, from an abstract model."""

  def __init__(self, abstract_model):
    nnx = _nnx()
    _, _, rest = nnx.split(abstract_model, nnx.Param, ...)
    types = sorted({type(v) for _, v in nnx.to_flat_state(rest)
                    if not isinstance(v, (nnx.RngState, nnx.Intermediate))},
                   key=lambda t: t.__name__)
    self.collections = [_collection_name(t) for t in types]
    if len(set(self.collections)) != len(self.collections) or "params" in self.collections:
      raise ValueError(f"NNX model variable types {[t.__name__ for t in types]} map to clashing "
                       f"collections {self.collections}.")
    self.filters = (nnx.Param, nnx.RngState, nnx.Intermediate,
                    *[lambda path, v, t=t: type(v) is t for t in types], ...)
    self.graphdef, self.params, self.rng_state, _, *collection_states, _ = nnx.split(
        abstract_model, *self.filters)
    self.templates = {"params": nnx.to_pure_dict(self.params),
                      **{name: nnx.to_pure_dict(state)
                         for name, state in zip(self.collections, collection_states)}}
    self.abstract = {"params": self.params, **dict(zip(self.collections, collection_states))}

  def variables(self, model) -> dict:
    """A concrete model's variables: `{'params': ..., **collections}` as pure dicts."""
    nnx = _nnx()
    _, params, _, _, *collection_states, _ = nnx.split(model, *self.filters)
    return {"params": _str_keys(nnx.to_pure_dict(params)),
            **{name: _str_keys(nnx.to_pure_dict(state))
               for name, state in zip(self.collections, collection_states)}}

  def merge(self, variables: dict, rng: Optional[jax.Array]):
    """A model holding `variables`; its RNG streams (dropout) are fresh keys from `rng`."""
    nnx = _nnx()
    missing = [name for name in self.abstract if name not in variables]
    if missing:
      raise ValueError(f"NNX model variables lack the collections {missing}; got "
                       f"{sorted(variables)}.")
    states = []
    for name, abstract in self.abstract.items():
      state = jax.tree.map(lambda x: x, abstract)  # A fresh copy to fill in.
      nnx.replace_by_pure_dict(state, _like(self.templates[name], variables[name]))
      states.append(state)
    base, counter = _random_key(rng), iter(range(1 << 30))

    def fresh(leaf):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.fold_in(base, next(counter))
      return jnp.zeros(leaf.shape, leaf.dtype)

    rng_state = jax.tree.map(fresh, self.rng_state)
    return nnx.merge(self.graphdef, states[0], rng_state, *states[1:])


def _takes(fn, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def from_nnx(model_or_constructor) -> ModelFns:
  """An NNX model as `ModelFns`.

  Args:
    model_or_constructor: `(rngs: nnx.Rngs) -> nnx.Module` (preferred: `init(rng, ...)` then
      builds the model from `rng`, so seeds give different initialisations), or an
      `nnx.Module` instance (its own weights are the initial variables; `rng` is ignored).
      The model's `__call__(inputs)` returns `Output` or logits; it also gets `train=` when
      it takes that keyword. Training mode is set with `model.train()` / `model.eval()`
      (Dropout, BatchNorm), dropout keys are drawn from `apply`'s `rng`.

  Variables: `{'params': nnx.Param values}` plus one collection per other variable type
  (`nnx.BatchStat` -> 'batch_stats'), as nested dicts. RNG streams are not variables.
  """
  nnx = _nnx()
  if isinstance(model_or_constructor, nnx.Module):
    instance = model_or_constructor
    layout = _NnxLayout(nnx.eval_shape(lambda: instance))
    initial = jax.device_get(layout.variables(instance))
    init = lambda rng, sample_inputs: initial
    call_target = type(instance)
  elif callable(model_or_constructor):
    constructor = model_or_constructor
    layout = None  # Found on first use: building the abstract model costs a trace.
    call_target = None

    # Jitted: NNX initialises eagerly op by op, one compilation per initializer otherwise.
    build = jax.jit(lambda rng: _layout().variables(constructor(nnx.Rngs(_random_key(rng)))))

    def init(rng, sample_inputs):
      del sample_inputs  # NNX models are built with their shapes.
      return build(rng)
  else:
    raise TypeError(f"from_nnx takes an nnx.Module or a function (rngs) -> nnx.Module; got "
                    f"{type(model_or_constructor).__name__}.")

  def _layout():
    nonlocal layout, call_target
    if layout is None:
      abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(0)))
      if not isinstance(abstract, nnx.Module):
        raise TypeError(f"The NNX constructor returned a {type(abstract).__name__}, not an "
                        "nnx.Module.")
      layout, call_target = _NnxLayout(abstract), type(abstract)
    return layout

  def apply(variables, inputs, *, train: bool, rng: Optional[jax.Array] = None):
    model = _layout().merge(variables, rng)
    if train:
      model.train()
    else:
      model.eval()
    kwargs = {"train": train} if _takes(call_target.__call__, "train") else {}
    result, sown = nnx.capture(model, nnx.Intermediate)(inputs, **kwargs)
    output = as_output(result, _flatten_sown(nnx.to_pure_dict(sown)))
    if not train:
      return output, {}
    new_variables = _layout().variables(model)
    return output, {name: new_variables[name] for name in _layout().collections}

  # Jitted (inlined when called inside the step's jit): an eager NNX call compiles op by op.
  return ModelFns(init=init, apply=jax.jit(apply, static_argnames=("train",)))


# -- plain functions --------------------------------------------------------------------------


def from_functions(init: Callable, apply: Callable) -> ModelFns:
  """A model given as two functions.

  Args:
    init: `(rng, sample_inputs) -> variables`, a dict with at least 'params'.
    apply: `(variables, inputs, *, train, rng) -> result`, where `result` is an `Output`,
      bare logits, or a pair `(Output or logits, new_model_state)`. `rng` is passed only when
      given (`apply` may leave it out of its signature if it uses no randomness).
  """
  if not callable(init) or not callable(apply):
    raise TypeError("from_functions takes two callables: init(rng, sample_inputs) and "
                    "apply(variables, inputs, *, train, rng).")
  takes_rng = _takes(apply, "rng") or any(
      p.kind == p.VAR_KEYWORD for p in _parameters(apply))

  def checked_init(rng, sample_inputs):
    variables = init(rng, sample_inputs)
    if not isinstance(variables, dict) or "params" not in variables:
      got = (f"the keys {sorted(variables)}" if isinstance(variables, dict) else
             f"a {type(variables).__name__}")
      raise ValueError("from_functions: init must return a dict of variables with a 'params' "
                       f"entry; got {got}.")
    return dict(variables)

  def wrapped_apply(variables, inputs, *, train: bool, rng: Optional[jax.Array] = None):
    kwargs = {"rng": rng} if takes_rng else {}
    result = apply(variables, inputs, train=train, **kwargs)
    if isinstance(result, tuple) and not isinstance(result, Output):
      if len(result) != 2:
        raise TypeError(f"from_functions: apply returned a tuple of {len(result)} items; "
                        "return an Output, logits, or (Output or logits, new_model_state).")
      result, new_model_state = result
      return as_output(result), (dict(new_model_state) if train else {})
    return as_output(result), {}

  return ModelFns(init=checked_init, apply=wrapped_apply)


def _parameters(fn):
  try:
    return list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return []


def to_model_fns(model: Any) -> ModelFns:
  """`ModelFns` from a `ModelFns`, a linen module or an NNX module instance."""
  if isinstance(model, ModelFns):
    return model
  if isinstance(model, nn.Module):
    return from_linen(model)
  if is_nnx_module(model):
    return from_nnx(model)
  raise TypeError(f"Expected a flax.linen Module, an nnx.Module or ModelFns; got "
                  f"{type(model).__name__}.")
