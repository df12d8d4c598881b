"""Flax models returning `Output(logits, features)`, and pure apply functions built from them."""

from kdjax.models.apply import ApplyFn, apply_fn, count_params, init_variables
from kdjax.models.output import Output
from kdjax.models.registry import MODELS, USES_BATCH_NORM, get_model

__all__ = ["ApplyFn", "apply_fn", "count_params", "init_variables", "Output", "MODELS",
           "USES_BATCH_NORM", "get_model"]
