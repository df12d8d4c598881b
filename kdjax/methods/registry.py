"""Methods by name. A new method module declares `METHODS = (cls, ...)` and is listed in
`_MODULES`; nothing in `kdjax.train` changes."""

from typing import Dict, Optional, Type

import ml_collections

from kdjax.methods import (base, born_again, byot, cat_kd, crd, cs_kd, ctkd, dino, ema_teacher,
                           feature, kernel, logit, meal_v2, minilm, multi_teacher, nd, ofd,
                           ps_kd, relational, review_kd, sequence, taid, tf_kd, vid)

_MODULES = (logit, relational, ctkd, taid, multi_teacher, sequence, feature, crd, kernel, vid,
            nd, cat_kd, ofd, review_kd, minilm, meal_v2, ps_kd, tf_kd, ema_teacher, byot, dino,
            cs_kd, born_again)

METHODS: Dict[str, Type[base.Method]] = {}
for _module in _MODULES:
  for _cls in _module.METHODS:
    assert _cls.name not in METHODS, f"method {_cls.name!r} is defined twice"
    METHODS[_cls.name] = _cls


def get_method_class(name: str) -> Type[base.Method]:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}.")
  return METHODS[name]


def build_method(config: ml_collections.ConfigDict, *,
                 num_train_examples: Optional[int] = None) -> base.Method:
  """Builds `config.method` from its hyper-parameters `config[config.method]`."""
  cls = get_method_class(config.method)
  method_config = config.get(cls.name, cls.default_config())
  method = cls(method_config)
  method.num_train_examples = num_train_examples
  if "teacher" in config:
    method.teacher_model = config.teacher.model
  return method


def default_method_configs() -> Dict[str, ml_collections.ConfigDict]:
  """Each method's default hyper-parameters, for `configs/common.py`."""
  return {name: cls.default_config() for name, cls in METHODS.items()
          if len(cls.default_config())}
