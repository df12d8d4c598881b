"""What a run trains with, built once from its config (flax's `create_train_state`): the data
pipeline, the parallel strategy, the method, the student and teacher apply functions, the
teacher's variables, the optimizer and the initial train state (on the host)."""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as data_lib
from kdjax import methods as methods_lib
from kdjax import models as models_lib
from kdjax.methods.base import Batch, Method
from kdjax.models.apply import ApplyFn
from kdjax.train import optimizer as optimizer_lib
from kdjax.train import parallel as parallel_lib, state as state_lib
from kdjax.train import teachers as teachers_lib
from kdjax.train.state import TrainState


@dataclasses.dataclass
class RunParts:
  pipeline: data_lib.InputPipeline
  parallel: Any  # parallel_lib.JitParallel | parallel_lib.PmapParallel
  method: Method
  student_apply: ApplyFn
  teacher_apply: Optional[ApplyFn]
  teacher_variables: Any  # None without a teacher; a list for multi-teacher methods.
  optimizer: optax.GradientTransformation
  initial_state: TrainState  # Host arrays.


def model_kwargs(name: str, parallel) -> dict:
  """BatchNorm models get the pmap axis name (cross-replica statistics under pmap)."""
  if name in models_lib.USES_BATCH_NORM and parallel.batch_norm_axis_name:
    return {"batch_norm_axis_name": parallel.batch_norm_axis_name}
  return {}


def build_run(config: ml_collections.ConfigDict,
              teacher_checkpoints: Sequence[str]) -> RunParts:
  """Builds the parts of one run; the teacher is loaded when the method needs one."""
  parallel = parallel_lib.get_parallel(config.parallel)
  pipeline = data_lib.InputPipeline(
      config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
      data_dir=config.data_dir or None, process_index=jax.process_index(),
      process_count=jax.process_count(), augment=config.augment,
      validation_examples=config.validation_examples,
      sampler=methods_lib.get_method_class(config.method).sampler)
  method = methods_lib.build_method(config, num_train_examples=pipeline.num_train_examples)
  method.batch_norm_axis_name = parallel.batch_norm_axis_name
  if method.needs_train_labels:
    method.train_labels = pipeline.train_labels()

  student_module = models_lib.get_model(config.student.model, num_classes=config.num_classes,
                                        **model_kwargs(config.student.model, parallel))
  student_apply = models_lib.apply_fn(student_module)
  init_rng, method_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  sample = np.zeros((2,) + tuple(pipeline.spec.input_shape), np.float32)
  student_variables = jax.device_get(
      models_lib.init_variables(student_module, init_rng, sample))

  teacher_apply, teacher_variables, teacher_sample = None, None, None
  if method.needs_teacher:
    teacher_apply, teacher_variables = teachers_lib.load_teachers(
        config, method, teacher_checkpoints, sample,
        model_kwargs=lambda name: model_kwargs(name, parallel))
    teacher_sample, _ = teacher_apply(teacher_variables, sample, train=False)

  student_sample, _ = student_apply(student_variables, sample, train=False)
  method_params, method_state = method.init(method_rng, Batch(
      student=student_sample, teacher=teacher_sample, labels=np.zeros((2,), np.int32),
      where=np.ones((2,), bool), step=jnp.zeros((), jnp.int32),
      teacher_variables=teacher_variables, student_variables=student_variables))
  optimizer = optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
  initial_state = jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=train_rng))
  return RunParts(pipeline=pipeline, parallel=parallel, method=method,
                  student_apply=student_apply, teacher_apply=teacher_apply,
                  teacher_variables=teacher_variables, optimizer=optimizer,
                  initial_state=initial_state)
