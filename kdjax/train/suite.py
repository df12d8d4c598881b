"""A suite of runs from one config: the teacher, then each student method, over seeds.

`config.suite = 'teacher,scratch,kd,dkd'`: run `teacher` trains `config.teacher.model` from
scratch (for `config.teacher.num_steps` steps when set), `teacher_<i>` the i-th model of
`config.teacher.extra` (for multi-teacher methods); every other run trains
`config.student.model` with the method of the same name, distilling from the teacher run's
checkpoint (or `config.teacher.checkpoint` when given). Each run lives in `workdir/<name>/`;
a finished run is not retrained. `workdir/summary.json` collects the run summaries.

Rows that expand into several runs:
- Seeds: with `config.seeds = (0, 1, 2)` every student row runs once per seed, in
  `workdir/<row>/seed<k>/` with `config.seed = k`; teacher runs are trained once, with
  `config.seed` (+ i for `teacher_<i>`). The summary keeps each seed's result and, per row, the
  mean over the finished seeds (under the usual keys), their sample standard deviation
  (`std`, ddof 1) and count (`num_seeds`). Without seeds, the layout is one run per row.
- Sweeps: `config.sweep = 'kd.temperature=1,2,4,8'` replaces the row `kd` by the rows
  `kd@temperature=1`, ..., each with that value of `config.kd.temperature`.
- Chains: the row of a method with a `generations_field` (born-again networks, Furlanello et
  al. 2018) becomes the runs `<name>_1 .. <name>_N` (N = `config.<name>.<generations_field>`):
  generation 1 is taught by the suite's `teacher` run, generation k+1 by generation k's
  checkpoint (of the same seed); then the born-again ensemble of the N generations (their probabilities averaged) is evaluated on
  the eval split and reported under `summary['ensembles'][<name>]`.
"""

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as data_lib
from kdjax import paths, signals, validation
from kdjax.methods.registry import get_method_class
from kdjax.train import files, metrics as metrics_lib, provenance
from kdjax.teachers import live as teachers_lib  # Ensembles of finished runs.
from kdjax.train.checkpoint import CheckpointError, saved_model_name
from kdjax.train.loop import RUN_SUMMARY, train_checked_run
from kdjax.train.config_paths import resolve_config_paths
from kdjax.train.preflight import check_memory_fits, check_method_fits_models
from kdjax.train.run_dir import check_run_dir
from kdjax.train.config_syntax import checkpoint_dirs, teacher_specs
from kdjax.train.plan import RunPlan
from kdjax.train.validate import ConfigError, validate_config
from kdjax.train.workdir import WorkdirLock, prepare_workdir

SUMMARY = "summary.json"
# Fields of a suite config that are not fields of its runs: removed from each run's config, so
# that a run's fingerprint (and its config.json) does not depend on the rest of the suite.
SUITE_ONLY_FIELDS = ("seeds", "sweep")


def _run_dict(config: ml_collections.ConfigDict) -> dict:
  data = config.to_dict()
  for field in SUITE_ONLY_FIELDS:
    data.pop(field, None)
  return data


def run_config(config: ml_collections.ConfigDict, run: str,
               specs=None) -> ml_collections.ConfigDict:
  """The single-run config for suite entry `run` (a teacher run or a method name); `specs`:
  the suite's `TeacherSpec`s (from its plan; parsed from `config` when not given)."""
  run_cfg = ml_collections.ConfigDict(_run_dict(config))
  specs = {spec.run: spec for spec in (teacher_specs(config) if specs is None else specs)}
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
class SuiteRun:
  """One training run of a suite."""
  row: str  # Its row of the results table: 'teacher', 'kd', 'kd@temperature=2', 'born_again_2'.
  directory: str  # Relative to the workdir: the row, or '<row>/seed<k>'.
  config: ml_collections.ConfigDict
  teacher_checkpoints: Tuple[str, ...]  # The checkpoints/ directories it distils from.
  seed: Optional[int]  # From config.seeds; None for teacher runs and single-seed suites.
  is_teacher: bool  # A teacher run, trained from scratch.
  plan: Optional[RunPlan] = None  # Its config checked (`plan_suite`); None until then.


@dataclasses.dataclass(frozen=True)
class SuiteEnsemble:
  """An ensemble of finished runs, evaluated once they all are: the born-again generations."""
  name: str  # Its key in summary['ensembles'].
  seed: Optional[int]
  members: Tuple[str, ...]  # The runs' directories, relative to the workdir.
  models: Tuple[str, ...]  # Their architectures.
  config: ml_collections.ConfigDict  # The data to evaluate on (the last member's config).


@dataclasses.dataclass(frozen=True)
class SuitePlan:
  """What a suite will run, checked: each run's config and its teachers' checkpoints."""
  config: ml_collections.ConfigDict  # The suite's config, its paths absolute.
  workdir: str  # Absolute.
  runs: List[SuiteRun]  # In the order they run.
  ensembles: List[SuiteEnsemble]
  teacher_runs: List[str]  # 'teacher', 'teacher_1', ...: trained from scratch.
  teacher_dirs: List[str]  # The checkpoints/ directory of each teacher.

  @property
  def run_configs(self) -> Dict[str, ml_collections.ConfigDict]:
    """Each run's config by its directory, in suite order."""
    return {run.directory: run.config for run in self.runs}

  @property
  def rows(self) -> List[str]:
    return list(dict.fromkeys(run.row for run in self.runs))


def _with(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields changed ('teacher.model': 'mlp')."""
  data = config.to_dict()
  for dotted, value in changes.items():
    *parents, field = dotted.split(".")
    node = data
    for parent in parents:
      node = node[parent]
    node[field] = value
  return ml_collections.ConfigDict(data)


def run_directory(row: str, seed: Optional[int]) -> str:
  """A run's directory relative to the workdir: `<row>`, or `<row>/seed<k>` over seeds."""
  return row if seed is None else os.path.join(row, f"seed{seed}")


def _seeded(config: ml_collections.ConfigDict, seed: Optional[int]):
  return config if seed is None else _with(config, seed=seed)


def _with_reference(config, cls, workdir: str, seed: Optional[int], rows: List[str]):
  """`config` seeded, with a method's reference model (`Method.reference_field`, AdaSPEC's)
  resolved: a row of the suite that runs before this one becomes that row's checkpoint of the
  same seed; anything else must be a checkpoint directory or exported model file."""
  config = _seeded(config, seed)
  field = cls.reference_field
  if not field:
    return config
  reference = str(config[cls.name][field] or "")
  where = f"config.{cls.name}.{field}={reference!r}"
  if reference in rows:
    if rows.index(reference) > rows.index(cls.name):
      raise ConfigError(f"{where} names a row that runs after {cls.name!r} in config.suite; "
                        f"list {reference!r} first.")
    return _with(config, **{f"{cls.name}.{field}": os.path.join(
        workdir, run_directory(reference, seed), "checkpoints")})
  path = paths.resolve(reference) if reference else ""
  if not path or not os.path.exists(path):
    raise ConfigError(f"{where} is neither a row of config.suite ({', '.join(rows)}) nor an "
                      "existing checkpoint directory or exported model file.")
  return _with(config, **{f"{cls.name}.{field}": path})


def expand_suite(plan: RunPlan, workdir: str):
  """(runs, ensembles) of a suite: its rows expanded by sweep, generations and seeds. Pure:
  reads nothing from disk. `plan` is the suite config's (`validate_config`)."""
  config, specs, sweep, rows = plan.config, plan.teachers, plan.sweep, list(plan.rows)
  teacher_names = [spec.run for spec in specs]
  teacher_dirs = tuple(checkpoint_dirs(specs, workdir))
  seeds = plan.seeds or (None,)
  language_model = plan.language_model
  runs, ensembles = [], []
  for name in rows or [config.method]:
    if name in teacher_names:
      runs.append(SuiteRun(name, name, run_config(config, name, specs), (), None, True))
      continue
    base = run_config(config, name, specs)
    cls = get_method_class(name)
    # A language model's rows all see the teacher at evaluation (agreement and speculative
    # decoding with the student as draft), scratch included; it trains only those that use it.
    teacher_ready = specs[0].checkpoint or config.teacher.get("pretrained") or (
        specs[0].run in rows and name in rows and rows.index(specs[0].run) < rows.index(name))
    teachers = teacher_dirs if cls.teacher_needs.checkpoint else (
        teacher_dirs[:1] if language_model and teacher_ready else ())

    if cls.generations_field:  # A chain: generation k teaches generation k + 1 (born-again).
      generations = int(config[name][cls.generations_field])
      for k in range(1, generations + 1):
        row = f"{name}_{k}"
        # The generation's index in its own config: extending the chain keeps its runs.
        cfg = _with(base, **{f"{name}.{cls.generations_field}": k})
        if k > 1:  # Taught by generation k - 1: the student architecture, from the suite.
          cfg = _with(cfg, **{"teacher.model": cfg.student.model, "teacher.checkpoint": None,
                              "teacher.extra": ""})
        for seed in seeds:
          parent = (teachers[:1] if k == 1 else (os.path.join(
              workdir, run_directory(f"{name}_{k - 1}", seed), "checkpoints"),))
          runs.append(SuiteRun(row, run_directory(row, seed), _seeded(cfg, seed), parent, seed,
                               False))
      for seed in seeds:
        members = tuple(run_directory(f"{name}_{k}", seed) for k in range(1, generations + 1))
        models = (config.student.model,) * generations
        ensembles.append(SuiteEnsemble(name, seed, members, models, _seeded(base, seed)))
      continue
    variants = [(name, base)]
    if sweep is not None and sweep.method == name:
      variants = [(sweep.row(text), _with(base, **{f"{name}.{sweep.field}": value}))
                  for text, value in zip(sweep.texts, sweep.values)]
    for row, cfg in variants:
      for seed in seeds:
        runs.append(SuiteRun(row, run_directory(row, seed),
                             _with_reference(cfg, cls, workdir, seed, rows),
                             teachers, seed, False))
  return runs, ensembles


def plan_suite(config: ml_collections.ConfigDict, workdir: str, *,
               num_devices: int) -> SuitePlan:
  """Checks everything that can be checked before a suite starts; reads, never writes.

  Raises:
    ConfigError, ConfigChanged, CheckpointError: naming the field or path at fault.
  """
  config = resolve_config_paths(config)
  workdir = paths.resolve(workdir)
  suite = validate_config(config, num_devices=num_devices)
  names = list(suite.rows) or [config.method]
  runs, ensembles = expand_suite(suite, workdir)
  # Every run is checked, and its plan made, once, before the first one starts.
  runs = [dataclasses.replace(run, plan=validate_config(run.config, num_devices=num_devices))
          for run in runs]
  specs = list(suite.teachers)
  teacher_dirs = checkpoint_dirs(specs, workdir)
  teacher_runs = [spec.run for spec in specs]
  students = [r for r in names if r not in teacher_runs and get_method_class(r).teacher_needs.checkpoint]
  if config.teacher.get("pretrained"):  # A Hugging Face directory teaches; no teacher run.
    listed = [run for run in teacher_runs if run in names]
    if listed:
      raise ConfigError(f"config.suite={config.suite!r} lists {listed[0]!r}, but "
                        f"config.teacher.pretrained={config.teacher.pretrained!r} is the "
                        f"teacher; remove {listed[0]!r} from config.suite.")
    students = []
  for name in students:  # The suite's teachers (a chained run's teacher is an earlier run).
    count = len(specs) if get_method_class(name).teacher_needs.ensemble else 1
    for spec, directory in zip(specs[:count], teacher_dirs[:count]):
      if spec.run in names:
        if names.index(spec.run) > names.index(name):
          raise ConfigError(f"config.suite={config.suite!r} runs {name!r} before its teacher "
                            f"run {spec.run!r}; list {spec.run!r} first.")
        continue
      if not os.path.exists(directory):  # A checkpoints/ directory or an exported file.
        raise ConfigError(
            f"Run {name!r} needs the teacher {spec.model!r}, but there is no checkpoint at "
            f"{directory!r}; add {spec.run!r} to config.suite before it, or give the "
            "checkpoint in config.teacher.checkpoint / config.teacher.extra.")
      own_run = os.path.join(workdir, spec.run)
      if not spec.checkpoint and not os.path.exists(os.path.join(own_run, RUN_SUMMARY)):
        raise ConfigError(
            f"Run {name!r} needs the teacher run {spec.run!r}, which has not finished in "
            f"{own_run!r} (no {RUN_SUMMARY}); add {spec.run!r} to config.suite to finish it.")

  for spec in specs:  # A teacher given by its checkpoint must be the configured model.
    if students and spec.checkpoint and os.path.isdir(spec.checkpoint):
      saved = saved_model_name(spec.checkpoint)
      if saved is not None and saved != spec.model:
        raise CheckpointError(
            f"The checkpoint in {spec.checkpoint!r} is of model {saved!r}, but the teacher is "
            f"configured as {spec.model!r} (config.teacher.model / config.teacher.extra).")
  checked = set()
  for run in runs:  # Taps and feature shapes, traced without compiling (once per config).
    key = run.config.to_json()
    # Pretrained directories are read, not built by name: `validate_pretrained` checks their
    # vocabularies and positions, and their shapes are the directories' own.
    pretrained = run.config.teacher.get("pretrained") or run.config.student.get("pretrained")
    if not run.is_teacher and get_method_class(run.config.method).teacher_needs.checkpoint \
        and key not in checked and not pretrained:
      checked.add(key)
      check_method_fits_models(run.plan.config)
  for run in {run.config.to_json(): run for run in runs}.values():
    check_memory_fits(run.plan.config)  # Before anything is allocated.
  for run in runs:  # Refuse a changed config, or a damaged summary, before any run starts.
    run_dir = os.path.join(workdir, run.directory)
    check_run_dir(run.config, run_dir, run.directory, move_aside=False)
    if os.path.exists(os.path.join(run_dir, RUN_SUMMARY)):
      files.read_json(os.path.join(run_dir, RUN_SUMMARY))  # One line naming it if damaged.
  return SuitePlan(config=config, workdir=workdir, runs=runs, ensembles=ensembles,
                   teacher_runs=teacher_runs, teacher_dirs=teacher_dirs)


def aggregate_seeds(results: Dict[int, dict]) -> dict:
  """One row from the results of its seeds (by seed): the mean of each number every seed has,
  under its key, and its sample standard deviation (ddof 1; 0 for one seed) in `std`; fields
  the seeds share (method, student; a count such as `steps`) as they are; `num_seeds`; and
  `seeds`, each seed's result by str(seed)."""
  ordered = [results[seed] for seed in sorted(results)]
  row, std = {}, {}
  for key, value in ordered[0].items():
    values = [r.get(key) for r in ordered]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) \
        and len(set(values)) == 1:
      row[key] = value  # The same count on every seed (steps, parameters): not averaged.
    elif all(validation.is_number(v) for v in values):
      array = np.array(values, np.float64)
      row[key] = float(array.mean())
      std[key] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    elif all(v == value for v in values):
      row[key] = value
  row.update(num_seeds=len(ordered), std=std,
             seeds={str(seed): results[seed] for seed in sorted(results)})
  return row


def summarize_runs(plan: SuitePlan, results: Dict[str, dict]) -> Dict[str, dict]:
  """summary['runs']: by row, in suite order; a row run over seeds aggregated
  (`aggregate_seeds`, over the seeds finished so far), any other the run's own summary."""
  rows = {}
  for row in plan.rows:
    runs = [run for run in plan.runs if run.row == row and run.directory in results]
    if not runs:
      continue
    if runs[0].seed is None:
      rows[row] = results[runs[0].directory]
    else:
      rows[row] = aggregate_seeds({run.seed: results[run.directory] for run in runs})
  return rows


def evaluate_ensemble(config: ml_collections.ConfigDict, checkpoint_dirs, models) -> dict:
  """Accuracy and cross-entropy on the eval split of the average of the models'
  probabilities, `p = mean_i softmax(z_i)` (the born-again ensemble, Furlanello et al. 2018,
  Sec. 3.2). Every process evaluates its rows; the sums are added over processes."""
  pipeline = data_lib.InputPipeline(
      config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
      data_dir=config.data_dir or None, process_index=jax.process_index(),
      process_count=jax.process_count(), augment=False,
      validation_examples=config.validation_examples)
  sample = np.zeros((2,) + tuple(pipeline.spec.input_shape), np.float32)
  applies, variables = teachers_lib.load_models(
      models, checkpoint_dirs, num_classes=config.num_classes, sample_inputs=sample,
      model_kwargs=lambda name: {})  # Eval mode: BatchNorm uses its running statistics.
  apply = teachers_lib.ensemble_apply_fn(applies)

  @jax.jit
  def sums(variables, inputs, labels, mask):
    output, _ = apply(variables, inputs, train=False)
    probs = jax.nn.softmax(output.logits.astype(jnp.float32), axis=-1).mean(axis=0)  # [B, C]
    correct = jnp.where(mask, jnp.argmax(probs, axis=-1) == labels, False)
    picked = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    nll = -jnp.log(jnp.maximum(picked, jnp.finfo(jnp.float32).tiny))
    return jnp.stack([correct.sum().astype(jnp.float32), jnp.where(mask, nll, 0.0).sum(),
                      mask.sum().astype(jnp.float32)])

  total = np.zeros(3, np.float64)
  for batch in pipeline.eval_batches(config.eval_batch_size, split="eval"):
    total += np.asarray(sums(variables, batch["inputs"], batch["labels"], batch["mask"]))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.asarray(multihost_utils.process_allgather(total)).sum(axis=0)
  count = max(total[2], 1.0)
  return {"eval_accuracy": float(total[0] / count), "eval_cross_entropy": float(total[1] / count)}


def _ensemble_summaries(plan: SuitePlan) -> Dict[str, dict]:
  """summary['ensembles']: each ensemble evaluated, aggregated over seeds like the rows."""
  by_name: Dict[str, Dict[Optional[int], dict]] = {}
  for ensemble in plan.ensembles:
    directories = [os.path.join(plan.workdir, m, "checkpoints") for m in ensemble.members]
    result = evaluate_ensemble(ensemble.config, directories, ensemble.models)
    result = {**result, "method": ensemble.name, "student": ensemble.models[0],
              "generations": len(ensemble.members), "members": list(ensemble.members)}
    if jax.process_index() == 0 and plan.config.progress:
      where = "" if ensemble.seed is None else f" seed {ensemble.seed}"
      print(f"[{ensemble.name} ensemble{where}] eval accuracy {result['eval_accuracy']:.4f} "
            f"({len(ensemble.members)} generations)", flush=True)
    by_name.setdefault(ensemble.name, {})[ensemble.seed] = result
  return {name: results[None] if None in results else aggregate_seeds(results)
          for name, results in by_name.items()}


def run_suite(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int,
              write_report: bool = True) -> dict:
  """Runs every entry of `config.suite` (or the single run `config.method` if the suite is
  empty), expanded over seeds, sweeps and generations, and writes `workdir/summary.json`
  after every run; at the end, the report `experiments.main` writes (results.md, results.csv,
  results.png; `write_report=False` leaves it out). Returns the summary.

  Paths may be relative or start with '~'. Every check of `plan_suite` runs first, then the
  workdir is created and locked against a second live run; only then does any work start.
  """
  with signals.handling_stop_signals():  # Every phase below, and between runs.
    summary = _run_planned_suite(plan_suite(config, workdir, num_devices=num_devices))
    if write_report and jax.process_index() == 0:
      from kdjax import report  # pylint: disable=g-import-not-at-top  (matplotlib)
      report.write_report(summary, paths.resolve(workdir))
    return summary


def _run_planned_suite(plan: SuitePlan) -> dict:
  is_writer = jax.process_index() == 0
  if is_writer:
    prepare_workdir(plan.workdir)
  summary_path = os.path.join(plan.workdir, SUMMARY)
  summary = {"runs": {}, "config": plan.config.to_dict()}
  results = {}
  with WorkdirLock(plan.workdir, enabled=is_writer):
    signals.mark_work_started()
    progress = metrics_lib.SuiteProgress(
        len(plan.runs), enabled=is_writer and bool(plan.config.get("progress", True)))
    for index, run in enumerate(plan.runs, start=1):
      run_dir = os.path.join(plan.workdir, run.directory)
      finished_before = os.path.exists(os.path.join(run_dir, RUN_SUMMARY))
      progress.start(index, run.directory, finished_before=finished_before)
      results[run.directory] = train_checked_run(
          run.plan, run_dir, teacher_checkpoints=run.teacher_checkpoints, name=run.directory)
      progress.finish(index, run.directory, results[run.directory],
                      finished_before=finished_before)
      summary["runs"] = summarize_runs(plan, results)
      summary["provenance"] = provenance.suite_provenance(results.values())
      if is_writer:  # Partial results survive a later crash.
        files.write_json_atomic(summary_path, summary)
    if plan.ensembles:
      summary["ensembles"] = _ensemble_summaries(plan)
      if is_writer:
        files.write_json_atomic(summary_path, summary)
  return summary
