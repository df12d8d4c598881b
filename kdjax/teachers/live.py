"""Live teachers: trained checkpoints, one or several (ensembles), as they run in a step.

The run's teachers are `config.teacher.model` and the models of `config.teacher.extra`
(parsed once into `TeacherSpec`s, `kdjax.train.config_syntax.teacher_specs`). A suite run can
also be taught by another suite run (born-again generations): its teacher is then that run's
checkpoint, and `load_models` loads any such list of checkpoints.
"""

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from kdjax import models as models_lib
from kdjax.models import fold as fold_lib, precision as precision_lib
from kdjax.models.output import Output


def load_teachers(config, specs: Sequence, checkpoint_dirs: Sequence[str], sample_inputs, *,
                  ensemble: bool, model_kwargs: Callable[[str], dict]):
  """Builds the teacher apply function and loads its variables.

  Args:
    config: the run's config (`num_classes`, `teacher.dtype`, `teacher.fold_batch_norm`).
    specs: the run's teachers (`TeacherSpec`s: `.model`), the main one first.
    checkpoint_dirs: their checkpoints, in the same order.
    sample_inputs: two model inputs (zeros), for the variables' expected shapes.
    ensemble: every teacher, as one apply function whose logits are stacked [N, ...]
      (variables: a list); otherwise the first teacher alone.
    model_kwargs: model name -> extra factory arguments.
  """
  # The run's checkpoint format (orbax) is the train package's; imported here, where used,
  # so that `kdjax.train` may import this package.
  from kdjax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  if not ensemble:
    specs = specs[:1]
  if len(checkpoint_dirs) < len(specs):
    raise CheckpointError(f"Method {config.method!r} needs {len(specs)} teacher checkpoints, "
                          f"got {len(checkpoint_dirs)}.")
  applies, variables = load_models([spec.model for spec in specs], checkpoint_dirs[:len(specs)],
                                   num_classes=config.num_classes, sample_inputs=sample_inputs,
                                   model_kwargs=model_kwargs)
  applies, variables = map(list, zip(*[
      frozen_teacher(spec.model, apply, teacher_variables, config=config,
                     sample_inputs=sample_inputs, model_kwargs=model_kwargs(spec.model))
      for spec, apply, teacher_variables in zip(specs, applies, variables)]))
  if ensemble:
    return ensemble_apply_fn(applies), variables
  return applies[0], variables[0]


def frozen_teacher(model: str, apply, variables, *, config, sample_inputs,
                   model_kwargs: dict):
  """A loaded teacher as it runs: BatchNorm folded into its convolutions
  (`config.teacher.fold_batch_norm`, `kdjax.models.fold`), then computing in
  `config.teacher.dtype` with its variables stored in that dtype (bfloat16 halves their
  memory; outputs stay float32, `kdjax.models.precision`). Unchanged for the defaults."""
  dtype = config.teacher.get("dtype", "float32")
  fold = config.teacher.get("fold_batch_norm", False)
  if not fold and dtype == "float32":
    return apply, variables
  kwargs = dict(model_kwargs, **precision_lib.dtype_kwargs(
      model, dtype, num_classes=config.num_classes))
  if fold:  # In float32, exact to rounding; cast afterwards.
    apply, variables = fold_lib.fold_model(model, variables, sample_inputs,
                                           num_classes=config.num_classes, **kwargs)
  elif kwargs != model_kwargs:  # The built-in model's own layers compute in `dtype`.
    apply = models_lib.get_model_fns(model, num_classes=config.num_classes, **kwargs).apply
  compute = precision_lib.compute_dtype(dtype, field="config.teacher.dtype")
  variables = jax.device_get(precision_lib.cast_floating(variables, compute))
  return precision_lib.mixed_precision(apply, compute), variables


def load_models(models: Sequence[str], checkpoint_dirs: Sequence[str], *, num_classes: int,
                sample_inputs, model_kwargs: Callable[[str], dict]) -> Tuple[list, list]:
  """Each trained model's apply function and variables (host arrays), from the run
  checkpoint directory of the same position; the checkpoint must hold that architecture."""
  from kdjax.train.checkpoint import load_model_variables  # pylint: disable=g-import-not-at-top
  applies, variables = [], []
  for model, directory in zip(models, checkpoint_dirs, strict=True):
    fns = models_lib.get_model_fns(model, num_classes=num_classes, **model_kwargs(model))
    expected = jax.eval_shape(fns.init, jax.random.PRNGKey(0), sample_inputs)
    variables.append(load_model_variables(directory, expected, model_name=model))
    applies.append(fns.apply)
  return applies, variables


def ensemble_apply_fn(apply_fns):
  """One apply function for several teachers: logits stacked as [N, *logits.shape]; the
  features of every teacher, as `'teacher<i>/<tap>'` (i = 0..N-1: teachers' taps may differ in
  shape, so they are not stacked), and the first teacher's also under their plain names.
  `variables` is the list of the teachers' variables."""

  def apply(variables, inputs, *, train: bool, rng: Optional[jax.Array] = None):
    outputs = [fn(v, inputs, train=train, rng=rng)[0] for fn, v in zip(apply_fns, variables)]
    features = dict(outputs[0].features)
    for i, output in enumerate(outputs):
      features.update({f"teacher{i}/{tap}": value for tap, value in output.features.items()})
    return Output(jnp.stack([o.logits for o in outputs]), features), {}

  return apply
