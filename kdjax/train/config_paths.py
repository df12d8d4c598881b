"""The path fields of a config, resolved (relative to the current directory, `~` expanded).

A config's paths are resolved once, when it enters the library (`run_suite`,
`train_and_evaluate`), so that a run's fingerprint, its checkpoint lookups and orbax (which
refuses relative paths) all see the same absolute path whatever the caller's spelling.
"""

import ml_collections

from kdjax import paths
from kdjax.train import config_syntax


def _resolve_extra_teachers(extra: str) -> str:
  """'cnn1d_small:runs/x/checkpoints,mlp' -> 'cnn1d_small:/abs/runs/x/checkpoints,mlp'."""
  return config_syntax.format_extra_teachers(
      [(model, paths.resolve(checkpoint) if checkpoint else "")
       for model, checkpoint in config_syntax.extra_teachers(extra)])


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with `data_dir`, `teacher.checkpoint`, `teacher.cache` and the
  checkpoints named in `teacher.extra` made absolute."""
  config = config.copy_and_resolve_references()
  if config.get("data_dir"):
    config.data_dir = paths.resolve(config.data_dir)
  teacher = config.get("teacher")
  if teacher is not None:
    if teacher.get("checkpoint"):
      teacher.checkpoint = paths.resolve(teacher.checkpoint)
    if teacher.get("cache"):
      teacher.cache = paths.resolve(teacher.cache)
    if teacher.get("extra"):
      teacher.extra = _resolve_extra_teachers(teacher.extra)
  return config
