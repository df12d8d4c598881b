"""A suite of runs from one config: the teacher, then each student method.

`config.suite = 'teacher,scratch,kd,dkd'`: run `teacher` trains `config.teacher.model` from
scratch (for `config.teacher.num_steps` steps when set), `teacher_<i>` the i-th model of
`config.teacher.extra` (for multi-teacher methods); every other run trains
`config.student.model` with the method of the same name, distilling from the teacher run's
checkpoint (or `config.teacher.checkpoint` when given). Each run lives in `workdir/<name>/`;
a finished run is not retrained. `workdir/summary.json` collects the run summaries.
"""

import dataclasses
import os
from typing import Dict, List

import jax
import ml_collections

from kdjax import paths
from kdjax.methods.registry import get_method_class
from kdjax.train import files
from kdjax.train import teachers as teachers_lib
from kdjax.train.checkpoint import CheckpointError, saved_model_name
from kdjax.train.loop import RUN_SUMMARY, train_checked_run
from kdjax.train.config_paths import resolve_config_paths
from kdjax.train.preflight import check_method_fits_models
from kdjax.train.run_dir import check_run_dir
from kdjax.train.validate import ConfigError, suite_runs, validate_config
from kdjax.train.workdir import WorkdirLock, prepare_workdir

SUMMARY = "summary.json"


def run_config(config: ml_collections.ConfigDict, run: str) -> ml_collections.ConfigDict:
  """The single-run config for suite entry `run`."""
  run_cfg = ml_collections.ConfigDict(config.to_dict())
  specs = {spec.run: spec for spec in teachers_lib.teacher_specs(config)}
  if run in specs:  # teacher, teacher_1, ...: trained from scratch, each with its own seed.
    index = list(specs).index(run)
    run_cfg.method = "scratch"
    run_cfg.student.model = specs[run].model
    run_cfg.seed = config.seed + index
    if config.teacher.num_steps:
      run_cfg.num_steps = config.teacher.num_steps
  else:
    run_cfg.method = run
  return run_cfg


@dataclasses.dataclass(frozen=True)
class SuitePlan:
  """What a suite will run, checked: each run's config and its teachers' checkpoints."""
  config: ml_collections.ConfigDict  # The suite's config, its paths absolute.
  workdir: str  # Absolute.
  run_configs: Dict[str, ml_collections.ConfigDict]  # In suite order.
  teacher_runs: List[str]  # 'teacher', 'teacher_1', ...: trained from scratch.
  teacher_dirs: List[str]  # The checkpoints/ directory of each teacher.


def plan_suite(config: ml_collections.ConfigDict, workdir: str, *,
               num_devices: int) -> SuitePlan:
  """Checks everything that can be checked before a suite starts; reads, never writes.

  Raises:
    ConfigError, ConfigChanged, CheckpointError: naming the field or path at fault.
  """
  config = resolve_config_paths(config)
  workdir = paths.resolve(workdir)
  runs = suite_runs(config) or [config.method]
  validate_config(config, num_devices=num_devices)
  run_configs = {run: run_config(config, run) for run in runs}
  for run_cfg in run_configs.values():  # Every run is checked before the first one starts.
    validate_config(run_cfg, num_devices=num_devices)
  specs = teachers_lib.teacher_specs(config)
  teacher_dirs = teachers_lib.checkpoint_dirs(config, workdir)
  teacher_runs = [spec.run for spec in specs]
  students = [r for r in runs if r not in teacher_runs and get_method_class(r).needs_teacher]
  for run in students:
    count = len(specs) if get_method_class(run).multiple_teachers else 1
    for spec, directory in zip(specs[:count], teacher_dirs[:count]):
      if spec.run in runs:
        if runs.index(spec.run) > runs.index(run):
          raise ConfigError(f"config.suite={config.suite!r} runs {run!r} before its teacher "
                            f"run {spec.run!r}; list {spec.run!r} first.")
        continue
      if not os.path.isdir(directory):
        raise ConfigError(
            f"Run {run!r} needs the teacher {spec.model!r}, but there is no checkpoint at "
            f"{directory!r}; add {spec.run!r} to config.suite before it, or give the "
            "checkpoint in config.teacher.checkpoint / config.teacher.extra.")
      own_run = os.path.join(workdir, spec.run)
      if not spec.checkpoint and not os.path.exists(os.path.join(own_run, RUN_SUMMARY)):
        raise ConfigError(
            f"Run {run!r} needs the teacher run {spec.run!r}, which has not finished in "
            f"{own_run!r} (no {RUN_SUMMARY}); add {spec.run!r} to config.suite to finish it.")

  for spec in specs:  # A teacher given by its checkpoint must be the configured model.
    if students and spec.checkpoint and os.path.isdir(spec.checkpoint):
      saved = saved_model_name(spec.checkpoint)
      if saved is not None and saved != spec.model:
        raise CheckpointError(
            f"The checkpoint in {spec.checkpoint!r} is of model {saved!r}, but the teacher is "
            f"configured as {spec.model!r} (config.teacher.model / config.teacher.extra).")
  for run in students:  # Taps and feature shapes, traced without compiling.
    check_method_fits_models(run_configs[run])
  for run, run_cfg in run_configs.items():  # Refuse a changed config before any run starts.
    check_run_dir(run_cfg, os.path.join(workdir, run), run, move_aside=False)
  return SuitePlan(config=config, workdir=workdir, run_configs=run_configs,
                   teacher_runs=teacher_runs, teacher_dirs=teacher_dirs)


def run_suite(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int) -> dict:
  """Runs every entry of `config.suite` (or the single run `config.method` if the suite is
  empty) and writes `workdir/summary.json`. Returns its contents.

  Paths may be relative or start with '~'. Every check of `plan_suite` runs first, then the
  workdir is created and locked against a second live run; only then does any work start.
  """
  plan = plan_suite(config, workdir, num_devices=num_devices)
  is_writer = jax.process_index() == 0
  if is_writer:
    prepare_workdir(plan.workdir)
  summary_path = os.path.join(plan.workdir, SUMMARY)
  summary = {"runs": {}, "config": plan.config.to_dict()}
  with WorkdirLock(plan.workdir, enabled=is_writer):
    for run, run_cfg in plan.run_configs.items():
      result = train_checked_run(
          run_cfg, os.path.join(plan.workdir, run),
          teacher_checkpoints=() if run in plan.teacher_runs else plan.teacher_dirs, name=run)
      summary["runs"][run] = result
      if is_writer:  # Partial results survive a later crash.
        files.write_json_atomic(summary_path, summary)
  return summary
