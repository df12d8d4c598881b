"""Methods by name. A new method module declares `METHODS = (cls, ...)` and is listed in
`_MODULES`; nothing in `kdjax.train` changes. A method defined outside kdjax (a notebook, a
user's module) joins with `register(cls)` before the config that names it is run."""

from typing import Dict, Optional, Type

import ml_collections

from kdjax.diffusion.methods import consistency as diffusion_consistency
from kdjax.diffusion.methods import dmd as diffusion_dmd
from kdjax.diffusion.methods import progressive as diffusion_progressive
from kdjax.methods import (adaspec, base, born_again, byot, cat_kd, crd, cs_kd, ctkd, dino,
                           distillm, miniplm, ema_teacher,
                           feature, kernel, logit, meal_v2, minilm, multi_teacher, nd, ofd,
                           on_policy, ps_kd, relational, review_kd, sequence, taid, tf_kd, uld,
                           vid)

_MODULES = (logit, relational, ctkd, taid, multi_teacher, sequence, feature, crd, kernel, vid,
            nd, cat_kd, ofd, review_kd, minilm, meal_v2, ps_kd, tf_kd, ema_teacher, byot, dino,
            cs_kd, born_again, on_policy, adaspec, distillm, miniplm, uld, diffusion_progressive,
            diffusion_consistency, diffusion_dmd)

METHODS: Dict[str, Type[base.Method]] = {}
for _module in _MODULES:
  for _cls in _module.METHODS:
    assert _cls.name not in METHODS, f"method {_cls.name!r} is defined twice"
    METHODS[_cls.name] = _cls


BUILTIN_METHODS = frozenset(METHODS)


def register(cls: Type[base.Method], *, replace: bool = False) -> Type[base.Method]:
  """Makes a `base.Method` subclass usable as `config.method` / a `config.suite` row under its
  `name`; returns `cls`, so it also works as a class decorator. Put its hyper-parameters in
  the experiment config as `config[cls.name] = cls.default_config()`.

  `replace=True` swaps an earlier registration of the same name (re-running a notebook cell);
  kdjax's own methods cannot be replaced.
  """
  if not (isinstance(cls, type) and issubclass(cls, base.Method)):
    raise TypeError(f"register: {cls!r} is not a subclass of kdjax.methods.base.Method.")
  name = getattr(cls, "name", None)
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"register: {cls.__name__}.name must be a Python identifier (it names a "
                     f"config field and a run directory), got {name!r}.")
  if getattr(cls, "__abstractmethods__", None):
    raise TypeError(f"register: {cls.__name__} does not define "
                    f"{', '.join(sorted(cls.__abstractmethods__))}.")
  if name in BUILTIN_METHODS:
    raise ValueError(f"register: {name!r} is one of kdjax's methods; give {cls.__name__} "
                     "another name.")
  if name in METHODS and METHODS[name] is not cls and not replace:
    raise ValueError(f"register: method {name!r} is already registered "
                     f"({METHODS[name].__qualname__}); pass replace=True to swap it.")
  METHODS[name] = cls
  return cls


def get_method_class(name: str) -> Type[base.Method]:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}.")
  return METHODS[name]


def build_method(config: ml_collections.ConfigDict, facts: Optional[base.RunFacts] = None, *,
                 num_train_examples: Optional[int] = None) -> base.Method:
  """Builds `config.method` from its hyper-parameters `config[config.method]` and hands it the
  run's facts (`Method.prepare`).

  Args:
    config: the experiment config.
    facts: what the run knows (the launcher's and the synthetic benchmark's); by default only
      `num_train_examples` (a shorthand for notebooks and tests) and the teacher model.
  """
  cls = get_method_class(config.method)
  method_config = config.get(cls.name, cls.default_config())
  method = cls(method_config)
  if facts is None:
    facts = base.RunFacts(num_train_examples=num_train_examples,
                          teacher_model=config.teacher.model if "teacher" in config else None)
  method.prepare(facts)
  return method


def default_method_configs() -> Dict[str, ml_collections.ConfigDict]:
  """Each method's default hyper-parameters, for `configs/common.py`."""
  return {name: cls.default_config() for name, cls in METHODS.items()
          if len(cls.default_config())}
