"""Distillation methods: a method = its losses + its own trainable and stateful parts."""

from kdjax.methods.base import (Batch, BatchOps, Method, RunFacts, TeacherNeeds,
                                single_device_ops)
from kdjax.methods.registry import (METHODS, build_method, default_method_configs,
                                    get_method_class, register)

__all__ = ["Batch", "BatchOps", "Method", "RunFacts", "TeacherNeeds", "single_device_ops", "METHODS", "build_method",
           "default_method_configs", "get_method_class", "register"]
