"""What each registered method declares: family, paper, hyper-parameters and their meanings
(`Method.family`, `Method.paper`, `Method.field_help`, `base.COMMON_FIELD_HELP`)."""

import dataclasses
import inspect
from typing import List, Optional, Tuple, Type

from kdjax.methods import base, registry


@dataclasses.dataclass(frozen=True)
class MethodRow:
  name: str
  family: str
  paper: str
  summary: str  # The first paragraph of the class docstring, on one line.
  fields: Tuple[Tuple[str, object, str], ...]  # (field, default, meaning), sorted by field.
  builtin: bool


def field_help(cls: Type[base.Method], field: str) -> Optional[str]:
  """The one-line meaning of `config.<cls.name>.<field>`: the nearest `field_help` in the
  class hierarchy that names it, else the shared meaning; None when nothing declares it."""
  for klass in cls.__mro__:
    declared = klass.__dict__.get("field_help", {})
    if field in declared:
      return declared[field]
  return base.COMMON_FIELD_HELP.get(field)


def _summary(cls) -> str:
  doc = inspect.getdoc(cls) or ""
  return " ".join(doc.split("\n\n")[0].split())


def method_rows() -> List[MethodRow]:
  """Every registered method (built-in and registered by the user), by family then name."""
  rows = []
  for name, cls in registry.METHODS.items():
    defaults = cls.default_config()
    fields = tuple((field, defaults[field], field_help(cls, field) or "")
                   for field in sorted(defaults.keys()))
    rows.append(MethodRow(name, cls.family or "other", cls.paper, _summary(cls), fields,
                          name in registry.BUILTIN_METHODS))
  order = {family: i for i, family in enumerate(base.FAMILIES)}
  return sorted(rows, key=lambda r: (order.get(r.family, len(order)), r.name))
