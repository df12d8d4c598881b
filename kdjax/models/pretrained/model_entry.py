"""The model name `'pretrained'`: configs name it in `config.teacher.model` /
`config.student.model` and give the directory in `config.teacher.pretrained` /
`config.student.pretrained` (`kdjax.teachers.pretrained` builds them from it).

It is registered (`kdjax.models.register`) so that the config's model checks accept it; its
factory needs the `directory` keyword, and without it returns `Unresolved`, a module with no
`max_length` (the run's checks read the directory's instead) that refuses to run.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

NAME = "pretrained"


class Unresolved(nn.Module):
  """The 'pretrained' model before its directory is known."""

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    raise ValueError("Model 'pretrained' is read from a directory: set "
                     "config.teacher.pretrained / config.student.pretrained to a Hugging "
                     "Face-format directory.")


def factory(num_classes: int, directory: Optional[str] = None, dtype: Any = jnp.float32):
  """`DecoderLM` of `directory` (whose vocabulary must be `num_classes`), computing in
  `dtype`; `Unresolved()` without a directory."""
  if directory is None:
    return Unresolved()
  from kdjax.models.pretrained.directory import read_config  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained.families import build_module  # pylint: disable=g-import-not-at-top
  config = read_config(directory)
  if config.vocab_size != num_classes:
    raise ValueError(f"{directory}: vocab_size {config.vocab_size} but num_classes is "
                     f"{num_classes}.")
  return build_module(config, dtype)


def register() -> None:
  from kdjax.models import registry  # pylint: disable=g-import-not-at-top
  if NAME not in registry.MODELS:
    registry.register(NAME, factory, input_kind="tokens")
