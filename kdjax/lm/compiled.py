"""Programs the rows of a suite repeat, compiled (or measured) once per process.

Every row of an LM suite ends with the same decoding metrics (`kdjax.lm.evaluation`): the
student's generation, speculative decoding greedy and sampled, the draft/target cost ratio.
Each row builds its own apply functions, so `jax.jit`'s cache (keyed by the functions'
identity) misses and each row traced, lowered and loaded (or compiled) the same programs again:
~2-3 s a row. Here an executable is kept under a key that names what the program computes:
the apply functions' code and closures (`function_key`: a linen apply's module compares by
its fields) and the arguments' shapes and dtypes (`abstract_key`); the variables stay
arguments, so another row's weights run through the same executable.
"""

from typing import Any, Callable, Dict, Hashable

import jax

# Executables kept (oldest dropped first): a suite needs a handful.
MAX_ENTRIES = 32
_EXECUTABLES: Dict[Hashable, Any] = {}
_VALUES: Dict[Hashable, Any] = {}


def function_key(fn, _depth: int = 0) -> Hashable:
  """What makes two functions the same program: their code and what their closures hold
  (functions recursively, hashable values by value, anything else by identity)."""
  code = getattr(fn, "__code__", None)
  if code is None or _depth > 8:
    return ("id", id(fn))
  cells = []
  for cell in getattr(fn, "__closure__", None) or ():
    value = cell.cell_contents
    if callable(value) and hasattr(value, "__code__"):
      cells.append(function_key(value, _depth + 1))
      continue
    try:
      hash(value)
      cells.append(("value", type(value), value))
    except TypeError:
      cells.append(("id", id(value)))
  return (code, tuple(cells))


def abstract_key(tree) -> Hashable:
  """The tree's structure and its leaves' shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple((tuple(jax.numpy.shape(x)), str(jax.numpy.result_type(x)))
                         for x in leaves))


def _remember(table: dict, key: Hashable, make: Callable[[], Any]):
  if key not in table:
    while len(table) >= MAX_ENTRIES:
      table.pop(next(iter(table)))
    table[key] = make()
  return table[key]


def executable(key: Hashable, lower: Callable[[], Any]):
  """The compiled `lower()` (a `jax.stages.Lowered`) for `key`, compiled on first use."""
  return _remember(_EXECUTABLES, key, lambda: lower().compile())


def value(key: Hashable, measure: Callable[[], Any]):
  """`measure()` for `key`, measured on first use (the draft/target cost ratio)."""
  return _remember(_VALUES, key, measure)


def clear() -> None:
  _EXECUTABLES.clear()
  _VALUES.clear()
