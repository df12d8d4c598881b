r"""Writes a teacher's outputs on every training batch of a run to `<workdir>/teacher_cache/`.

    python -m experiments.cache_teacher --config=configs/quickstart.py --workdir=runs/q \
        [--topk=K] [--epochs=E] [--features=tap1,tap2]
    python -m experiments.main --config=configs/quickstart.py --workdir=runs/q_cached \
        --config.suite=kd --config.teacher.cache=runs/q/teacher_cache

The teacher is `config.teacher.model` from `config.teacher.checkpoint`, else from the suite's
teacher run `<workdir>/teacher/checkpoints`. For each step of `config.num_steps` (or of `E`
epochs) the exact augmented batch the student will see (a pure function of (config.seed,
step)) is made again, the teacher runs on it in eval mode, and its top-k logits (all of them
with `--topk=0`), the chosen feature taps, the examples' ids and digests of their inputs are
stored (format, writer and checks: `kdjax/teachers/disk_cache.py`; the replay is FKD's, Shen & Xing
2022). The cache is bound to the config's dataset, seed, global batch size, augmentation,
held-out validation examples, sampler and teacher model: a run with any of them different
refuses it. `--topk` defaults to `config.teacher.cache_topk`.

The last line printed is one JSON object (steps, bytes, seconds).
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The suite's workdir; the cache goes to "
                               "<workdir>/teacher_cache.")
_TOPK = flags.DEFINE_integer("topk", None, "Top-k logits kept per example; 0 keeps all. "
                             "Default: config.teacher.cache_topk.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Cover this many epochs of the training split "
                               "instead of config.num_steps steps (0).")
_FEATURES = flags.DEFINE_list("features", [], "Teacher feature taps to cache too.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing cache.")
flags.mark_flags_as_required(["config", "workdir"])


def write_cache(config, workdir: str, *, topk=None, epochs: int = 0, features=(),
                overwrite: bool = False) -> dict:
  """Writes `<workdir>/teacher_cache/` for `config` (see the module docstring); returns the
  summary printed as JSON. User mistakes raise `cli.UsageError` (one line) before any work.

  Args:
    config: the experiment config (paths may be relative).
    workdir: the suite's workdir (its teacher run's checkpoints, unless
      `config.teacher.checkpoint` is set).
    topk: logits kept per example (0: all); None: `config.teacher.cache_topk`.
    epochs: cover this many epochs instead of `config.num_steps` steps (0).
    features: teacher feature taps to cache as well.
    overwrite: replace an existing cache.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import data, paths  # pylint: disable=g-import-not-at-top
  from kdjax.teachers import disk_cache as cache_lib  # pylint: disable=g-import-not-at-top
  from kdjax.methods.registry import get_method_class  # pylint: disable=g-import-not-at-top
  from kdjax.train.config_syntax import checkpoint_dirs  # pylint: disable=g-import-not-at-top
  from kdjax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from kdjax.train.config_paths import resolve_config_paths  # pylint: disable=g-import-not-at-top
  from kdjax.train.validate import validate_config  # pylint: disable=g-import-not-at-top
  from kdjax.validation import ConfigError  # pylint: disable=g-import-not-at-top

  config = resolve_config_paths(config)
  config.teacher.cache = ""  # The cache being written is not read.
  workdir = paths.resolve(workdir)
  if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 0):
    raise cli.UsageError(f"--topk must be an integer >= 0 (0 keeps all {config.num_classes} "
                         f"logits), got {topk!r}.")
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
    raise cli.UsageError(f"--epochs must be an integer >= 0 (0: config.num_steps steps), got "
                         f"{epochs!r}.")
  if jax.process_count() > 1:
    raise cli.UsageError("experiments.cache_teacher runs in one process; start it without "
                         "jax.distributed.")
  try:
    plan = validate_config(config, num_devices=jax.device_count())
  except ConfigError as error:
    raise cli.UsageError(str(error)) from None
  topk = config.teacher.cache_topk if topk is None else topk
  topk = None if not topk or topk >= config.num_classes else int(topk)
  checkpoint_dir = checkpoint_dirs(plan.teachers, workdir)[0]
  if not os.path.isdir(checkpoint_dir):
    raise cli.UsageError(
        f"No teacher checkpoint at {checkpoint_dir!r}: train the suite's teacher first "
        "(experiments.main --config.suite=teacher) or set --config.teacher.checkpoint.")
  directory = os.path.join(workdir, cache_lib.CACHE_DIRNAME)
  if os.path.exists(directory) and not overwrite:
    raise cli.UsageError(f"{directory!r} exists; pass --overwrite to replace it.")

  sampler = get_method_class(config.method).sampler
  try:
    pipeline = data.InputPipeline(
        config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
        data_dir=config.data_dir or None, augment=config.augment,
        validation_examples=config.validation_examples, sampler=sampler)
  except (data.DatasetNotPreparedError, data.InvalidLabelsError) as error:
    raise cli.UsageError(str(error)) from None
  num_steps = (cache_lib.steps_for_epochs(
      epochs, pipeline.num_train_examples - config.validation_examples,
      config.global_batch_size) if epochs else config.num_steps)

  try:
    return cache_lib.write_cache(config, pipeline, directory=directory,
                                 checkpoint_dir=checkpoint_dir, num_steps=num_steps, topk=topk,
                                 features=features, epochs=epochs)
  except (CheckpointError, ConfigError) as error:
    raise cli.UsageError(str(error)) from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    summary = write_cache(_CONFIG.value, _WORKDIR.value, topk=_TOPK.value,
                          epochs=_EPOCHS.value, features=_FEATURES.value,
                          overwrite=_OVERWRITE.value)
  except cli.UsageError as error:
    cli.fail(str(error))
  print(f"Teacher cache of {summary['steps']} steps written to {summary['directory']} in "
        f"{summary['seconds']:.1f} s.")
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
