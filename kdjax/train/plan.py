"""A run's plan: its config checked and parsed once, at the boundary.

`validate.validate_config(config, num_devices=...)` checks a run's ConfigDict and returns its
`RunPlan`; `train_and_evaluate` and `run_suite` build one per run (a suite: every run's, before
the first starts), and everything downstream (`run_setup`, the teacher chooser, the method's
shape check, the loop) reads the plan's parsed fields instead of parsing the config's strings
again (`config_syntax` holds those parsers).
"""

import dataclasses
from typing import Optional, Tuple, Type

import ml_collections

from kdjax.train.config_syntax import Sweep, TeacherSpec


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One run, checked.

  Attributes:
    config: the run's config, paths absolute, checked (read it, do not change it: the run's
      fingerprint and its `config.json` come from it).
    method: the method's class (`config.method`).
    teachers: `config.teacher.model` then `config.teacher.extra`, as `TeacherSpec`s.
    rows: `config.suite`'s rows, in order (empty: the one run `config.method`).
    seeds: `config.seeds` (empty: the one seed `config.seed`).
    sweep: `config.sweep` parsed, or None.
    parallel: `config.parallel`.
    mesh: (data, model) device counts (`config.mesh` for the 2-D strategies).
    language_model: the dataset is text (token windows, next-token prediction).
    num_devices: the device count the plan was checked for.
  """
  config: ml_collections.ConfigDict
  method: Type
  teachers: Tuple[TeacherSpec, ...]
  rows: Tuple[str, ...]
  seeds: Tuple[int, ...]
  sweep: Optional[Sweep]
  parallel: str
  mesh: Tuple[int, int]
  language_model: bool
  num_devices: int

  @property
  def teacher_models(self) -> Tuple[str, ...]:
    return tuple(spec.model for spec in self.teachers)
