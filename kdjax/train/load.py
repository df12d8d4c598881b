"""A trained student back from disk: `kdjax.load_run(path)`.

    loaded = kdjax.load_run('runs/quickstart', run='kd')   # a suite workdir and its row
    loaded = kdjax.load_run('runs/quickstart/kd')          # or the run directory itself
    output, _ = loaded.apply_fn(loaded.variables, inputs, train=False)   # Output(logits, ...)

The student's variables come from the run's latest checkpoint (the end of training, or the
last checkpoint of an unfinished run); the method's own parameters (connectors, projectors)
are dropped. A student initialised from a pretrained directory (model 'pretrained') is
rebuilt from that directory's `config.json` (`config.student.pretrained`, which must still
exist) with the run's trained weights. A model or dataset registered by the training script (`kdjax.models.register`,
`kdjax.data.register_arrays`) must be registered in the loading process as well: the model
to rebuild the apply function, the dataset (optional) to check the checkpoint's shapes.
"""

import os
from typing import Any, Callable, List, NamedTuple, Optional

import jax
import ml_collections

from kdjax import models as models_lib
from kdjax import paths
from kdjax.train import files
from kdjax.train.checkpoint import CheckpointError, load_model_variables, read_latest

_CONFIG, _CHECKPOINTS, _RUN_SUMMARY = "config.json", "checkpoints", "run_summary.json"


class LoadedRun(NamedTuple):
  """A trained student.

  Attributes:
    apply_fn: `(variables, inputs, *, train, rng=None) -> (Output, new_model_state)`, pure.
    variables: `{'params': ..., **model_state}` as host (numpy) arrays.
    config: the run's config (its `config.json`).
    summary: its `run_summary.json`, or None for a run that has not finished.
  """
  apply_fn: Callable[..., Any]
  variables: dict
  config: ml_collections.ConfigDict
  summary: Optional[dict]


def _is_run_dir(directory: str) -> bool:
  if ".replaced-" in os.path.basename(directory):  # A run moved aside (allow_config_change).
    return False
  return (os.path.isfile(os.path.join(directory, _CONFIG)) and
          os.path.isdir(os.path.join(directory, _CHECKPOINTS)))


def suite_runs(workdir: str) -> List[str]:
  """The run directories of a suite workdir, relative to it (`'kd'`, `'kd/seed0'`), sorted."""
  found = []
  for name in sorted(os.listdir(workdir)):
    child = os.path.join(workdir, name)
    if _is_run_dir(child):
      found.append(name)
    elif os.path.isdir(child):  # A row over seeds: <row>/seed<k>/.
      found.extend(f"{name}/{sub}" for sub in sorted(os.listdir(child))
                   if _is_run_dir(os.path.join(child, sub)))
  return found


def _pick_run(workdir: str, run: Optional[str]) -> str:
  runs = suite_runs(workdir)
  if not runs:
    raise FileNotFoundError(
        f"load_run: {workdir!r} is neither a run directory (with {_CONFIG} and {_CHECKPOINTS}/) "
        "nor a suite workdir holding any.")
  if run is None:
    if len(runs) == 1:
      return runs[0]
    raise ValueError(f"load_run: the suite in {workdir!r} has several runs; pick one with "
                     f"run=, one of: {', '.join(runs)}.")
  run = run.strip("/")
  if run in runs:
    return run
  seeds = [r for r in runs if r.startswith(run + "/")]
  if len(seeds) == 1:
    return seeds[0]
  if seeds:
    raise ValueError(f"load_run: run={run!r} ran over several seeds in {workdir!r}; pick one "
                     f"of: {', '.join(seeds)}.")
  raise ValueError(f"load_run: no run {run!r} in {workdir!r}; its runs: {', '.join(runs)}.")


def student_model_kwargs(config, *, what: str = "load_run") -> dict:
  """The model factory's keywords beyond `num_classes` for the run's student: for model
  'pretrained' (a student initialised from a Hugging Face-format directory) its architecture
  is that directory's `config.json`, `config.student.pretrained`; {} for the other models.

  Raises:
    FileNotFoundError: the directory recorded in the run's config is gone (one line naming it).
  """
  from kdjax.models.pretrained import model_entry  # pylint: disable=g-import-not-at-top
  if config.student.model != model_entry.NAME:
    return {}
  directory = config.student.get("pretrained", "") or ""
  if not directory or not os.path.isfile(os.path.join(directory, "config.json")):
    raise FileNotFoundError(
        f"{what}: the run's student is model 'pretrained' built from config.student.pretrained="
        f"{directory!r}, which holds no config.json any more; the architecture is read from "
        "there (the trained weights are the run's checkpoint): restore that directory.")
  return {"directory": directory}


def _sample_inputs(config) -> Optional[jax.ShapeDtypeStruct]:
  """A sample batch's shape for the run's dataset, or None when it is not known here (a
  dataset registered by the training script and not in this process)."""
  from kdjax.train.run_setup import sample_inputs  # pylint: disable=g-import-not-at-top
  try:
    sample = sample_inputs(config)
  except ValueError:
    return None
  return jax.ShapeDtypeStruct(sample.shape, sample.dtype)


def _restore_unchecked(directory: str) -> dict:
  """The student's variables of the latest checkpoint (verified against its checksums),
  without a model to check their shapes by."""
  _, state, _ = read_latest(directory)
  return {"params": state["params"]["student"], **state.get("model_state", {})}


def load_run(workdir_or_run_dir: str, *, run: Optional[str] = None) -> LoadedRun:
  """The trained student of a run: its pure apply function, variables, config and summary.

  Args:
    workdir_or_run_dir: a run directory (holding `config.json` and `checkpoints/`) or a suite
      workdir (holding one per run); relative and `~` paths work.
    run: in a suite workdir, the run: its row (`'kd'`) or directory (`'kd/seed1'`); may be
      left out when the workdir holds a single run.

  Raises:
    FileNotFoundError: no such directory, or no run in it.
    ValueError: `run` is missing or names no run (the message lists the runs); the student
      model is not known in this process (register it first).
    CheckpointError: the checkpoint is missing or does not match the model.
  """
  directory = paths.resolve(os.fspath(workdir_or_run_dir))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_run: {directory!r} is not a directory.")
  if _is_run_dir(directory):
    if run is not None:
      raise ValueError(f"load_run: {directory!r} is a run directory; run={run!r} is only for "
                       "a suite workdir.")
    run_dir = directory
  else:
    run_dir = os.path.join(directory, _pick_run(directory, run))
  config_path = os.path.join(run_dir, _CONFIG)
  config = files.read_json(config_path)  # DamagedFileError (one line) if it does not read.
  if not isinstance(config, dict):
    raise files.damaged(config_path, f"a JSON {type(config).__name__}, not a config")
  config = ml_collections.ConfigDict(config)
  summary_path = os.path.join(run_dir, _RUN_SUMMARY)
  summary = files.read_json(summary_path) if os.path.exists(summary_path) else None
  model = config.student.model
  fns = models_lib.get_model_fns(model, num_classes=config.num_classes,
                                 **student_model_kwargs(config))
  checkpoints = os.path.join(run_dir, _CHECKPOINTS)
  sample = _sample_inputs(config)
  if sample is None:
    variables = _restore_unchecked(checkpoints)
  else:
    expected = jax.eval_shape(fns.init, jax.random.PRNGKey(0), sample)
    variables = load_model_variables(checkpoints, expected, model_name=model)
  return LoadedRun(apply_fn=fns.apply, variables=jax.device_get(variables), config=config,
                   summary=summary)
