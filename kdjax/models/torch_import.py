"""Convert PyTorch `state_dict`s of the anchors' model definitions into kdjax variables.

Published CIFAR-100 teachers (RepDistiller's `.pth` files) are PyTorch `state_dict`s; a model
family that can import them defines `TORCH_IMPORT = {name: convert}` where
`convert(builder: VariablesBuilder) -> None` fills `{'params': ..., 'batch_stats': ...}` in
its own Flax names by calling the builder's helpers with the PyTorch names. `convert_state_dict`
then checks that every PyTorch tensor was used exactly once and that every array has the
shape the Flax model expects, so a wrong mapping fails with the names, never silently.

Layouts: PyTorch conv weights are OIHW (grouped convs `[out, in / groups, kh, kw]`) and Flax
kernels HWIO (`[kh, kw, in / groups, out]`); PyTorch Linear is `[out, in]`, Flax Dense
`[in, out]`. BatchNorm `weight/bias/running_mean/running_var` become `scale/bias` (params) and
`mean/var` (batch_stats). No torch import: arrays are numpy.
"""

from typing import Callable, Dict, Mapping

import numpy as np


class TorchWeights:
  """A PyTorch state_dict (name -> numpy array) that records which tensors were used."""

  def __init__(self, state_dict: Mapping[str, np.ndarray]):
    self._arrays = {name: np.asarray(value) for name, value in state_dict.items()
                    if not name.endswith("num_batches_tracked")}
    self._used = set()

  def __contains__(self, name: str) -> bool:
    return name in self._arrays

  def take(self, name: str) -> np.ndarray:
    if name not in self._arrays:
      raise KeyError(f"The PyTorch state_dict has no tensor {name!r}.")
    if name in self._used:
      raise KeyError(f"PyTorch tensor {name!r} is used twice by the conversion.")
    self._used.add(name)
    return self._arrays[name]

  def unused(self):
    return sorted(set(self._arrays) - self._used)

  def conv(self, prefix: str) -> Dict[str, np.ndarray]:
    """`{prefix}.weight` (OIHW) [+ `{prefix}.bias`] -> Flax Conv params."""
    params = {"kernel": np.transpose(self.take(f"{prefix}.weight"), (2, 3, 1, 0))}
    if f"{prefix}.bias" in self:
      params["bias"] = self.take(f"{prefix}.bias")
    return params

  def linear(self, prefix: str) -> Dict[str, np.ndarray]:
    """`{prefix}.weight` [out, in] [+ bias] -> Flax Dense params."""
    params = {"kernel": np.transpose(self.take(f"{prefix}.weight"))}
    if f"{prefix}.bias" in self:
      params["bias"] = self.take(f"{prefix}.bias")
    return params

  def batch_norm(self, prefix: str):
    """-> (params {'scale', 'bias'}, batch_stats {'mean', 'var'})."""
    return ({"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")},
            {"mean": self.take(f"{prefix}.running_mean"),
             "var": self.take(f"{prefix}.running_var")})

  def layer_norm(self, prefix: str) -> Dict[str, np.ndarray]:
    return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}


class VariablesBuilder:
  """Collects Flax variables by module path: `add_conv('stage1_block0/conv1', 'layer1.0.conv1')`."""

  def __init__(self, weights: TorchWeights):
    self.weights = weights
    self.params: dict = {}
    self.batch_stats: dict = {}

  @staticmethod
  def _put(tree: dict, path: str, value: dict) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
      tree = tree.setdefault(name, {})
    if leaf in tree:
      raise KeyError(f"Flax module {path!r} is filled twice by the conversion.")
    tree[leaf] = value

  def conv(self, flax_path: str, torch_prefix: str) -> None:
    self._put(self.params, flax_path, self.weights.conv(torch_prefix))

  def dense(self, flax_path: str, torch_prefix: str) -> None:
    self._put(self.params, flax_path, self.weights.linear(torch_prefix))

  def batch_norm(self, flax_path: str, torch_prefix: str) -> None:
    params, stats = self.weights.batch_norm(torch_prefix)
    self._put(self.params, flax_path, params)
    self._put(self.batch_stats, flax_path, stats)

  def layer_norm(self, flax_path: str, torch_prefix: str) -> None:
    self._put(self.params, flax_path, self.weights.layer_norm(torch_prefix))

  def param(self, flax_path: str, value: np.ndarray) -> None:
    *module, leaf = flax_path.split("/")
    tree = self.params
    for name in module:
      tree = tree.setdefault(name, {})
    tree[leaf] = value

  def variables(self) -> dict:
    variables = {"params": self.params}
    if self.batch_stats:
      variables["batch_stats"] = self.batch_stats
    return variables


Converter = Callable[[VariablesBuilder], None]


def _flat(tree, prefix=""):
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}/{key}" if prefix else str(key)))
    return out
  return {prefix: tuple(tree.shape)}


def convert_state_dict(name: str, state_dict: Mapping[str, np.ndarray], *, num_classes: int,
                       input_shape=(32, 32, 3)) -> dict:
  """PyTorch state_dict of model `name` -> kdjax variables, checked against the Flax model.

  Raises ValueError naming the model and the tensors when a tensor is left over, missing,
  or of the wrong shape.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from kdjax.models import apply as apply_lib  # pylint: disable=g-import-not-at-top
  from kdjax.models import registry  # pylint: disable=g-import-not-at-top

  converters = importable_models()
  if name not in converters:
    raise ValueError(f"No PyTorch import for model {name!r}; models with one: "
                     f"{', '.join(sorted(converters))}.")
  weights = TorchWeights(state_dict)
  builder = VariablesBuilder(weights)
  converters[name](builder)
  if weights.unused():
    raise ValueError(f"PyTorch tensors not used by the {name} conversion: "
                     f"{', '.join(weights.unused())}.")
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), builder.variables())
  module = registry.get_model(name, num_classes=num_classes)
  expected = jax.eval_shape(lambda: apply_lib.init_variables(
      module, jax.random.key(0), jnp.zeros((1, *input_shape))))
  got, want = _flat(variables), _flat(expected)
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: converted {got[k]} vs model {want[k]}" for k in sorted(set(got) & set(want))
               if got[k] != want[k]]
  if problems:
    raise ValueError(f"The PyTorch state_dict does not convert into {name} with "
                     f"{num_classes} classes: {'; '.join(problems[:8])}"
                     f"{' ...' if len(problems) > 8 else ''}.")
  return variables


def importable_models() -> Dict[str, Converter]:
  """Model name -> converter, collected from the families' `TORCH_IMPORT` tables."""
  from kdjax.models import registry  # pylint: disable=g-import-not-at-top
  converters = {}
  for family in registry._FAMILIES:  # pylint: disable=protected-access
    converters.update(getattr(family, "TORCH_IMPORT", {}))
  return converters
