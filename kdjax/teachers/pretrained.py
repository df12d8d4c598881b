"""A pretrained Hugging Face-format directory as a run's teacher, or as its student's start.

    config.teacher.model = "pretrained"; config.teacher.pretrained = "/path/to/Llama-3.2-1B"
    config.student.model = "pretrained"; config.student.pretrained = "/path/to/smaller"

The teacher runs like any live teacher (eval mode, under `stop_gradient`), computing in
`config.teacher.pretrained_dtype` ('bfloat16' by default: a frozen model loses nothing that
matters to distillation in bfloat16 and halves its memory, as TRL's and DistiLLM's scripts load
their teachers; 'float32' to change it) with its parameters stored in that dtype; its logits
are float32. The student starts from its directory's weights in float32 (the optimizer's master
weights) and computes in `config.dtype`. Both apply functions are kdjax's
(`kdjax.models.apply_fn`), so generation uses their KV cache and the fused losses read their
`hidden` and `unembedding` features. Token ids come from the teacher directory's tokenizer
(`kdjax.data.chat_data.ChatTokenizer`); student and teacher must share the vocabulary (checked
by `kdjax.train.validate.validate_pretrained`).
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp

from kdjax import paths
from kdjax.models import apply as apply_lib
from kdjax.models import precision as precision_lib
from kdjax.models.adapters import ModelFns
from kdjax.models.pretrained import directory as directory_lib
from kdjax.models.pretrained.families import build_module

DEFAULT_TEACHER_DTYPE = "bfloat16"


def teacher_directory(config) -> str:
  """`config.teacher.pretrained`, absolute; '' when the teacher is not pretrained."""
  return paths.resolve(config.teacher.get("pretrained", "") or "") or ""


def student_directory(config) -> str:
  """`config.student.pretrained`, absolute; '' when the student starts from random weights."""
  return paths.resolve(config.student.get("pretrained", "") or "") or ""


def load_teacher(config) -> Tuple[Any, Any]:
  """(apply function, variables as host arrays) of `config.teacher.pretrained`, computing and
  stored in `config.teacher.pretrained_dtype`."""
  dtype = precision_lib.compute_dtype(
      config.teacher.get("pretrained_dtype", DEFAULT_TEACHER_DTYPE),
      field="config.teacher.pretrained_dtype")
  loaded = directory_lib.load_pretrained(teacher_directory(config), dtype=dtype)
  return apply_lib.apply_fn(loaded.module), jax.device_get(loaded.variables)


def student_model(config) -> Tuple[ModelFns, Any]:
  """(`ModelFns` of the student computing in `config.dtype`, its float32 variables as host
  arrays) of `config.student.pretrained`; `init` returns those variables whatever the rng (the
  run starts from the checkpoint)."""
  dtype = precision_lib.compute_dtype(config.get("dtype", "float32"), field="config.dtype")
  loaded = directory_lib.load_pretrained(student_directory(config), dtype=jnp.float32)
  module = build_module(loaded.config, dtype)
  variables = jax.device_get(loaded.variables)
  return ModelFns(init=lambda rng, inputs: variables,
                  apply=apply_lib.apply_fn(module)), variables
