"""The small languages of config strings, parsed here and nowhere else.

    config.suite     'teacher,scratch,kd'             -> `suite_runs`
    config.seeds     (0, 1, 2) / --config.seeds=0,1,2 -> `suite_seeds`
    config.sweep     'kd.temperature=1,2,4'           -> `parse_sweep` (a `Sweep`)
    config.teacher   model, checkpoint, extra='mlp:DIR,cnn1d' -> `teacher_specs`
    config.mesh      'data=2,model=4'                 -> `mesh_shape`

Each parser raises one line naming the config field and the form it takes. They read a
ConfigDict and return plain, frozen values; `kdjax.train.plan` calls them once per run and
everything downstream reads its `RunPlan`.
"""

import os
from typing import List, NamedTuple, Optional, Tuple

from kdjax import paths, validation
from kdjax.methods.registry import METHODS
from kdjax.names import did_you_mean
from kdjax.validation import ConfigError

PARALLEL_KINDS = ("jit", "pmap", "jit_2d", "jit_2d_fsdp")
MESH_KINDS = ("jit_2d", "jit_2d_fsdp")  # The kinds that read `config.mesh`.
MESH_AXES = ("data", "model")


def suite_runs(config) -> list:
  """The run names of `config.suite` ('teacher,scratch,kd'), in order."""
  return [name.strip() for name in str(config.suite).split(",") if name.strip()]


def suite_seeds(config) -> Tuple[int, ...]:
  """`config.seeds`: the seeds every student row of the suite runs with, in order; empty (or
  no such field) means the one run with `config.seed`."""
  seeds = config.get("seeds", ()) or ()
  if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)):
    raise ConfigError(f"config.seeds must be a list of non-negative integers (on the command "
                      f"line --config.seeds=0,1,2), got {seeds!r}.")
  for seed in seeds:
    validation.require(seed, validation.NON_NEGATIVE_INT, "every entry of config.seeds")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.seeds={tuple(seeds)!r} repeats a seed; each seed runs once.")
  return tuple(int(seed) for seed in seeds)


class Sweep(NamedTuple):
  """`config.sweep = '<method>.<field>=<v1>,<v2>,...'`: the suite row `<method>` runs once per
  value, as the rows `<method>@<field>=<v>` (`texts`: each value as written)."""
  method: str
  field: str
  values: tuple
  texts: Tuple[str, ...]

  def row(self, text: str) -> str:
    return f"{self.method}@{self.field}={text}"


_SWEEP_FORM = ("must read '<method>.<field>=<v1>,<v2>,...' (a method of config.suite and one "
               "of its fields), e.g. 'kd.temperature=1,2,4,8'")


def _sweep_value(text: str, current, where: str):
  """`text` as the type of the field's current value."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ConfigError(f"{where}: {text!r} is not a bool; write true or false.")
    return text.lower() == "true"
  try:
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError:
    raise ConfigError(f"{where}: {text!r} is not a {type(current).__name__}.") from None
  if isinstance(current, str) or current is None:
    return text
  raise ConfigError(f"{where}: a {type(current).__name__} field cannot be swept; sweep a "
                    "number, bool or string field.")


def parse_sweep(config) -> Optional[Sweep]:
  """`config.sweep` parsed and checked against the config, or None when empty (or absent)."""
  spec = str(config.get("sweep", "") or "").strip()
  if not spec:
    return None
  target, equals, values_text = spec.partition("=")
  method, dot, field = target.strip().partition(".")
  method, field = method.strip(), field.strip()
  if not equals or not dot or not method or not field:
    raise ConfigError(f"config.sweep={spec!r} {_SWEEP_FORM}.")
  runs = suite_runs(config) or [config.method]
  if method not in runs:
    raise ConfigError(f"config.sweep={spec!r} sweeps {method!r}, which is not a run of "
                      f"config.suite={config.suite!r}; sweep one of: {', '.join(runs)}.")
  if method in METHODS and METHODS[method].generations_field:
    raise ConfigError(f"config.sweep={spec!r}: {method} cannot be swept (its generations are "
                      "chained runs); sweep another method or run one suite per value.")
  if method not in METHODS or method not in config or not config[method].keys():
    raise ConfigError(f"config.sweep={spec!r}: run {method!r} has no hyper-parameters "
                      f"(no config.{method} block) to sweep.")
  block = config[method]
  if field not in block:
    raise ConfigError(f"config.sweep={spec!r}: config.{method} has no field {field!r}"
                      f"{did_you_mean(field, list(block.keys()))}; its fields: "
                      f"{', '.join(sorted(block.keys()))}.")
  texts = tuple(text.strip() for text in values_text.split(","))
  if not all(texts):
    raise ConfigError(f"config.sweep={spec!r} has an empty value; {_SWEEP_FORM}.")
  if len(set(texts)) != len(texts):
    raise ConfigError(f"config.sweep={spec!r} repeats a value; each value is one row.")
  for text in texts:
    if "/" in text or text in (".", ".."):  # The value names the row's directory.
      raise ConfigError(f"config.sweep={spec!r}: value {text!r} cannot name a run directory.")
  values = tuple(_sweep_value(text, block[field], f"config.sweep={spec!r} ({method}.{field})")
                 for text in texts)
  return Sweep(method, field, values, texts)


class TeacherSpec(NamedTuple):
  run: str  # The suite run that trains it ('teacher', 'teacher_1', ...).
  model: str
  checkpoint: Optional[str]  # Given explicitly in the config, else the run's checkpoints/.


def extra_teachers(extra) -> List[Tuple[str, str]]:
  """`config.teacher.extra` ('mlp:runs/x/checkpoints,cnn1d') as [(model, checkpoint or '')]."""
  entries = []
  for entry in (e.strip() for e in str(extra or "").split(",")):
    if entry:
      model, _, checkpoint = entry.partition(":")
      entries.append((model.strip(), checkpoint.strip()))
  return entries


def format_extra_teachers(entries: List[Tuple[str, str]]) -> str:
  """The inverse of `extra_teachers`."""
  return ",".join(f"{model}:{checkpoint}" if checkpoint else model
                  for model, checkpoint in entries)


def teacher_specs(config) -> List[TeacherSpec]:
  """The run's teachers: `config.teacher.model` (run 'teacher'), then each model of
  `config.teacher.extra` (runs 'teacher_1', 'teacher_2', ...)."""
  specs = [TeacherSpec("teacher", config.teacher.model,
                       paths.resolve(config.teacher.checkpoint) or None)]
  for model, checkpoint in extra_teachers(config.teacher.extra):
    specs.append(TeacherSpec(f"teacher_{len(specs)}", model, paths.resolve(checkpoint) or None))
  return specs


def checkpoint_dirs(specs: List[TeacherSpec], workdir: str) -> List[str]:
  """Each teacher's checkpoint: the one given, else its suite run's `checkpoints/`."""
  return [spec.checkpoint or os.path.join(workdir, spec.run, "checkpoints") for spec in specs]


def mesh_shape(kind: str, mesh: str, num_devices: int) -> Tuple[int, int]:
  """`config.mesh` ('data=2,model=4', or 'model=4' with data = the remaining devices) as
  (data, model) sizes for a `MESH_KINDS` strategy; (num_devices, 1) for the others.

  Raises:
    ValueError: one line naming config.mesh and what is allowed.
  """
  mesh = (mesh or "").strip()
  example_model = 2 if num_devices % 2 == 0 else 1
  example = f"e.g. 'data={num_devices // example_model},model={example_model}'"
  if kind not in MESH_KINDS:
    if mesh:
      raise ValueError(f"config.mesh={mesh!r} applies only to config.parallel in {MESH_KINDS}, "
                       f"not {kind!r}; leave it empty.")
    return num_devices, 1
  if not mesh:
    raise ValueError(f"config.parallel={kind!r} needs config.mesh, the sizes of the axes "
                     f"{MESH_AXES} over {num_devices} devices, {example}.")
  sizes = {}
  for part in mesh.split(","):
    axis, equals, size = part.strip().partition("=")
    axis = axis.strip()
    if not equals or axis not in MESH_AXES or axis in sizes or not size.strip().isdigit() or (
        int(size) < 1):
      raise ValueError(f"config.mesh={mesh!r} must read 'data=<n>,model=<m>' (positive sizes, "
                       f"each axis once, {MESH_AXES} only), {example}.")
    sizes[axis] = int(size)
  if "model" not in sizes:
    raise ValueError(f"config.mesh={mesh!r} must give the 'model' axis size, {example}.")
  model = sizes["model"]
  data = sizes.get("data", num_devices // model)
  if data * model != num_devices:
    raise ValueError(f"config.mesh={mesh!r} has {data} x {model} = {data * model} devices but "
                     f"there are {num_devices}; the sizes must multiply to {num_devices}.")
  return data, model
