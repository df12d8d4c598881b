"""Methods by name. A new method adds its class here and nothing in `kdjax.train` changes."""

from typing import Dict, Optional, Type

import ml_collections

from kdjax.methods import (base, crd, ctkd, feature, logit, multi_teacher, relational,
                           sequence, taid)

METHODS: Dict[str, Type[base.Method]] = {
    cls.name: cls for cls in (
        logit.Scratch, logit.KD, logit.DKD, logit.KDStd, logit.NKD, relational.DIST,
        ctkd.CTKD, taid.TAID, multi_teacher.MultiTeacherKD, *sequence.SEQUENCE_METHODS,
        *feature.FEATURE_METHODS, crd.CRD)
}


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
  return method


def default_method_configs() -> Dict[str, ml_collections.ConfigDict]:
  """Each method's default hyper-parameters, for `configs/common.py`."""
  return {name: cls.default_config() for name, cls in METHODS.items()
          if len(cls.default_config())}
