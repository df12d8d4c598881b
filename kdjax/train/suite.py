"""A suite of runs from one config: the teacher, then each student method.

`config.suite = 'teacher,scratch,kd,dkd'`: run `teacher` trains `config.teacher.model` from
scratch (for `config.teacher.num_steps` steps when set); every other run trains
`config.student.model` with the method of the same name, distilling from the teacher run's
checkpoint (or `config.teacher.checkpoint` when given). Each run lives in `workdir/<name>/`;
a finished run is not retrained. `workdir/summary.json` collects the run summaries.
"""

import os

import ml_collections

from kdjax.train import files
from kdjax.train.loop import check_run_dir, train_and_evaluate
from kdjax.train.validate import ConfigError, suite_runs, validate_config

SUMMARY = "summary.json"


def run_config(config: ml_collections.ConfigDict, run: str) -> ml_collections.ConfigDict:
  """The single-run config for suite entry `run`."""
  run_cfg = ml_collections.ConfigDict(config.to_dict())
  if run == "teacher":
    run_cfg.method = "scratch"
    run_cfg.student.model = config.teacher.model
    if config.teacher.num_steps:
      run_cfg.num_steps = config.teacher.num_steps
  else:
    run_cfg.method = run
  return run_cfg


def teacher_checkpoint_dir(config, workdir: str) -> str:
  return config.teacher.checkpoint or os.path.join(workdir, "teacher", "checkpoints")


def run_suite(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int) -> dict:
  """Runs every entry of `config.suite` (or the single run `config.method` if the suite is
  empty) and writes `workdir/summary.json`. Returns its contents."""
  runs = suite_runs(config) or [config.method]
  validate_config(config, num_devices=num_devices)
  run_configs = {run: run_config(config, run) for run in runs}
  for run_cfg in run_configs.values():  # Every run is checked before the first one starts.
    validate_config(run_cfg, num_devices=num_devices)
  teacher_dir = teacher_checkpoint_dir(config, workdir)
  needs_teacher = [r for r in runs if r != "teacher" and r != "scratch"]
  if needs_teacher and "teacher" not in runs and not os.path.isdir(teacher_dir):
    raise ConfigError(
        f"Runs {needs_teacher} need a teacher, but there is no teacher checkpoint at "
        f"{teacher_dir!r}; add 'teacher' to config.suite or set config.teacher.checkpoint.")

  for run, run_cfg in run_configs.items():  # Refuse a changed config before any run starts.
    check_run_dir(run_cfg, os.path.join(workdir, run), run, move_aside=False)

  summary_path = os.path.join(workdir, SUMMARY)
  summary = {"runs": {}, "config": config.to_dict()}
  for run, run_cfg in run_configs.items():
    result = train_and_evaluate(
        run_cfg, os.path.join(workdir, run),
        teacher_checkpoint=None if run == "teacher" else teacher_dir, name=run)
    summary["runs"][run] = result
    files.write_json_atomic(summary_path, summary)  # Partial results survive a later crash.
  return summary
