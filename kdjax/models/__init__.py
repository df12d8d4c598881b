"""Flax models returning `Output(logits, features)`, and pure apply functions built from them.

Models of your own (linen, NNX or plain functions) are registered by name with `register`;
`get_model_fns(name, num_classes=...)` gives any model, built-in or registered, as
`ModelFns(init, apply)` (`kdjax.models.adapters`).
"""

from kdjax.models.adapters import ModelFns, from_functions, from_linen, from_nnx
from kdjax.models.apply import ApplyFn, apply_fn, count_params, init_variables
from kdjax.models.output import Output
from kdjax.models.registry import (MODELS, USES_BATCH_NORM, get_model, get_model_fns, register,
                                   unregister)
# Hugging Face-format checkpoints (kdjax.models.pretrained); safetensors, tokenizers and jinja2
# are imported only when a checkpoint is read or written.
from kdjax.models.pretrained import load_pretrained, save_pretrained

__all__ = ["ApplyFn", "apply_fn", "count_params", "init_variables", "Output", "MODELS",
           "USES_BATCH_NORM", "get_model", "get_model_fns", "register", "unregister", "ModelFns",
           "from_functions", "from_linen", "from_nnx", "load_pretrained", "save_pretrained"]
