"""Shape checks of a run before any data is read or anything compiled.

`check_method_fits_models(config)` traces the student, the teacher and the method's `init`
with `jax.eval_shape` (no FLOPs, no compilation): a feature tap that a model does not have, or
a student/teacher pair of shapes a method cannot compare, fails as a ConfigError naming the
field, both shapes and what would fix it, before the suite's first run starts.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models as models_lib
from kdjax.data.catalog import get_dataset_spec
from kdjax.methods.base import (STUDENT_VIEW_PREFIX, TEACHER_VIEW_PREFIX, Batch, RunFacts,
                                single_device_ops)
from kdjax.methods.registry import build_method, get_method_class
from kdjax.train.run_setup import sample_inputs
from kdjax.train.validate import ConfigError

_SAMPLE_BATCH = 2


@functools.lru_cache(maxsize=64)
def abstract_model(model_name: str, num_classes: int, input_shape, input_dtype=jnp.float32):
  """(variables, Output) of the model on a sample batch, as shapes only (cached: a suite asks
  for the same models once per run)."""
  fns = models_lib.get_model_fns(model_name, num_classes=num_classes)
  inputs = jax.ShapeDtypeStruct((_SAMPLE_BATCH,) + tuple(input_shape), input_dtype)

  def forward(x):
    variables = fns.init(jax.random.PRNGKey(0), x)
    return variables, fns.apply(variables, x, train=False)[0]

  return jax.eval_shape(forward, inputs)


# A model registered again under the same name (`replace=True`) must not be checked stale.
models_lib.registry.ON_CHANGE.append(abstract_model.cache_clear)


def _sample_data(method) -> dict:
  """`Batch.data` of a sample batch as the method's sampler makes it."""
  data = {"index": jnp.zeros((_SAMPLE_BATCH,), jnp.int32)}
  if method.sampler == "class_pairs":  # Row 0's partner is row 1 (`pairing.partner_rows`).
    data["partner_row"] = jnp.asarray([1, -1], jnp.int32)
  return data


def _view_outputs(method, config, inputs: jax.ShapeDtypeStruct, *,
                  teacher_model: Optional[str]) -> dict:
  """`Batch.data` entries of the method's extra views (`Method.views`), as shapes: the
  student's Output on each view, and the teacher's on those `teacher_needs.views` names."""
  views = jax.eval_shape(
      method.views, {"inputs": inputs, "index": jax.ShapeDtypeStruct((_SAMPLE_BATCH,), jnp.int32)},
      jax.ShapeDtypeStruct((2,), jnp.uint32))
  data = {}
  for name, view in views.items():
    shape, dtype = tuple(view.shape[1:]), view.dtype
    data[STUDENT_VIEW_PREFIX + name] = abstract_model(config.student.model, config.num_classes,
                                                      shape, dtype)[1]
    if teacher_model and name in method.teacher_needs.views:
      data[TEACHER_VIEW_PREFIX + name] = abstract_model(teacher_model, config.num_classes,
                                                        shape, dtype)[1]
  return data


def check_method_fits_models(config) -> None:
  """Raises ConfigError when `config.method` cannot run on the configured models: its `init`
  and one `loss` are traced on the models' abstract outputs (the main teacher,
  `config.teacher.model`)."""
  teacher_model = config.teacher.model
  spec = get_dataset_spec(config.dataset)
  # A dataset of unknown size: any size will do for shapes; the run checks the real one.
  num_examples = spec.train_examples or 2**20
  # Any labels of the right size will do for shapes.
  method = build_method(config, RunFacts(
      num_train_examples=num_examples, teacher_model=config.teacher.model,
      train_labels=lambda: np.arange(num_examples) % config.num_classes))
  if method.sampler == "class_pairs" and config.global_batch_size % 2:
    raise ConfigError(f"Method {config.method!r} trains on class pairs (half the batch are the "
                      f"partners of the other half): config.global_batch_size="
                      f"{config.global_batch_size} must be even.")
  needs = method.teacher_needs
  if needs.ensemble:  # Logits only: stacked teachers are checked when loaded.
    return
  sample = sample_inputs(config)  # Token windows for text: their length is a config field.
  input_shape, input_dtype = tuple(sample.shape[1:]), sample.dtype
  student_variables, student = abstract_model(config.student.model, config.num_classes,
                                              input_shape, input_dtype)
  if needs.self_teacher:  # The student's own apply, on variables from the method state.
    teacher_variables, teacher = student_variables, student
  elif needs.checkpoint:
    teacher_variables, teacher = abstract_model(teacher_model,
                                                config.num_classes, input_shape, input_dtype)
  else:
    teacher_variables, teacher = None, None
  view_data = _view_outputs(method, config, jax.ShapeDtypeStruct(
      (_SAMPLE_BATCH,) + input_shape, input_dtype), teacher_model=(
          config.student.model if needs.self_teacher else
          teacher_model if needs.checkpoint else None))

  def init_and_loss(student, teacher, teacher_variables, student_variables, view_data):
    label_shape = student.logits.shape[:-1]  # [b] for classifiers, [b, T] for LMs.
    sample = Batch(student=student, teacher=teacher,
                   labels=jnp.zeros(label_shape, jnp.int32),
                   where=jnp.ones(label_shape, bool), step=jnp.zeros((), jnp.int32),
                   rng=jax.random.PRNGKey(0),
                   data={**_sample_data(method), **view_data},
                   teacher_variables=teacher_variables)
    params, state = method.init(jax.random.PRNGKey(0),
                                dataclasses.replace(sample, student_variables=student_variables))
    return method.loss(params, state, sample, single_device_ops())

  try:
    jax.eval_shape(init_and_loss, student, teacher, teacher_variables, student_variables,
                   view_data)
  except ValueError as error:
    raise ConfigError(f"{error} (student {config.student.model!r}, teacher "
                      f"{teacher_model!r})") from None


def available_memory_bytes() -> Optional[int]:
  """The kernel's estimate of memory available without swapping (`MemAvailable`), or None
  where /proc/meminfo is not readable (not Linux)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree_util.tree_leaves(tree))


def memory_estimate(config) -> dict:
  """Lower bounds, in bytes, of what one process of the run holds at once: {'batches': the
  training batches in flight (prefetch + the one in use + the next), 'eval_batches',
  'activations': the models' outputs and feature taps at the batch size, kept for the
  backward pass (on a CPU backend, where they share host memory), 'state': the student's
  parameters, gradients and two optimizer moments}. Shapes only (`jax.eval_shape`)."""
  per_process = max(1, config.global_batch_size // jax.process_count())
  example = sample_inputs(config, 1)
  example_bytes = example.nbytes
  in_flight = config.get("prefetch", 0) + 2
  estimate = {"batches": example_bytes * per_process * in_flight,
              "eval_batches": example_bytes * config.eval_batch_size * 2,
              "activations": 0, "state": 0}
  if jax.default_backend() != "cpu" or "pretrained" in (config.student.model,
                                                          config.teacher.model):
    return estimate  # Device memory is the accelerator's; directories are not built by name.
  shape, dtype = tuple(example.shape[1:]), example.dtype
  variables, output = abstract_model(config.student.model, config.num_classes, shape, dtype)
  per_example = _tree_bytes(output) // _SAMPLE_BATCH
  if get_method_class(config.method).teacher_needs.checkpoint:
    per_example += _tree_bytes(abstract_model(config.teacher.model, config.num_classes, shape,
                                              dtype)[1]) // _SAMPLE_BATCH
  estimate["activations"] = 2 * per_example * per_process  # Forward values + their gradients.
  estimate["state"] = 4 * _tree_bytes(variables.get("params", {}))
  return estimate


def check_memory_fits(config, available: Optional[int] = None) -> None:
  """Raises ConfigError, naming the field to lower, when even the lower bound of
  `memory_estimate` exceeds the memory available: a run that cannot fit is refused before it
  allocates, instead of being killed by the kernel's out-of-memory killer without a word."""
  available = available_memory_bytes() if available is None else available
  if available is None:
    return
  estimate = memory_estimate(config)
  needed = sum(estimate.values())
  if needed <= available:
    return
  field = ("config.eval_batch_size" if estimate["eval_batches"] > needed / 2 else
           "config.global_batch_size")
  gib = 1024 ** 3
  parts = ", ".join(f"{name.replace('_', ' ')} {value / gib:.1f}" for name, value in
                    estimate.items() if value)
  raise ConfigError(
      f"This run needs at least {needed / gib:.1f} GiB of memory ({parts} GiB) with "
      f"config.global_batch_size={config.global_batch_size} and config.eval_batch_size="
      f"{config.eval_batch_size}, but {available / gib:.1f} GiB are available; lower {field}.")
