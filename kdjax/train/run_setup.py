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
from kdjax import paths
from kdjax import methods as methods_lib
from kdjax import models as models_lib
from kdjax.data import teacher_cache as teacher_cache_lib
from kdjax.lm import teacher_logits as teacher_logits_lib
from kdjax.methods.base import Batch, Method
from kdjax.models import precision as precision_lib
from kdjax.models.apply import ApplyFn
from kdjax.models.output import Output
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


def uses_teacher_cache(config) -> bool:
  """True when the run reads its teacher's outputs from `config.teacher.cache`."""
  return bool(config.teacher.get("cache", "")) and methods_lib.get_method_class(
      config.method).needs_teacher


def is_language_model_run(config: ml_collections.ConfigDict) -> bool:
  """True when `config.dataset` is a text dataset (token windows, next-token prediction)."""
  return data_lib.get_dataset_spec(config.dataset).input_kind == "tokens"


def sample_inputs(config: ml_collections.ConfigDict, batch_size: int = 2) -> np.ndarray:
  """Zeros shaped like `batch_size` model inputs of the config's dataset (token windows of
  `config.lm.sequence_length` for text), without opening the data."""
  spec = data_lib.get_dataset_spec(config.dataset)
  if spec.input_kind == "tokens":
    return np.zeros((batch_size, config.lm.sequence_length), np.int32)
  return np.zeros((batch_size,) + tuple(spec.input_shape), np.float32)


def build_pipeline(config: ml_collections.ConfigDict, *, teacher_cache=None):
  """The run's input pipeline: token windows for a text dataset (`config.lm`), else examples
  (with cached teacher outputs joining the training batches when `teacher_cache` is given)."""
  common = dict(global_batch_size=config.global_batch_size, seed=config.seed,
                data_dir=config.data_dir or None, process_index=jax.process_index(),
                process_count=jax.process_count(),
                validation_examples=config.validation_examples)
  if is_language_model_run(config):
    if teacher_cache is not None:
      raise ValueError("config.teacher.cache is for classification datasets; a language "
                       "model's teacher runs live.")
    lm = config.lm
    return data_lib.LMInputPipeline(
        config.dataset, sequence_length=lm.sequence_length, tokenizer=lm.tokenizer,
        vocab_size=lm.vocab_size or None, tokenizer_dir=lm.tokenizer_dir or None, **common)
  return data_lib.InputPipeline(
      config.dataset, augment=config.augment, teacher_cache=teacher_cache,
      sampler=methods_lib.get_method_class(config.method).sampler, **common)


def build_run(config: ml_collections.ConfigDict,
              teacher_checkpoints: Sequence[str]) -> RunParts:
  """Builds the parts of one run; the teacher is loaded when the method needs one."""
  parallel = parallel_lib.get_parallel(config.parallel, config.get("mesh", ""))
  method_class = methods_lib.get_method_class(config.method)
  # Cached teacher outputs (`config.teacher.cache`) join the batches; the teacher is not built.
  teacher_cache = (teacher_cache_lib.open_checked(config, sampler=method_class.sampler)
                   if uses_teacher_cache(config) else None)
  pipeline = build_pipeline(config, teacher_cache=teacher_cache)
  method = methods_lib.build_method(config, num_train_examples=pipeline.num_train_examples)
  sample = sample_inputs(config)
  reference_field = getattr(method, "reference_field", None)
  if reference_field:  # A frozen model of the student's architecture (AdaSPEC, MiniPLM).
    _, (method.reference_variables,) = teachers_lib.load_models(
        [config.student.model], [paths.resolve(config[method.name][reference_field])],
        num_classes=config.num_classes, sample_inputs=sample,
        model_kwargs=lambda name: model_kwargs(name, parallel))
  method.batch_norm_axis_name = parallel.batch_norm_axis_name
  if method.needs_train_labels:
    method.train_labels = pipeline.train_labels()

  # `config.dtype`: the student computes in it (train and eval); parameters stay float32.
  student_model = precision_lib.model_fns(
      config.student.model, num_classes=config.num_classes, dtype=config.get("dtype", "float32"),
      **model_kwargs(config.student.model, parallel))
  student_apply = student_model.apply
  init_rng, method_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  student_variables = jax.device_get(
      student_model.init(init_rng, sample))

  teacher_apply, teacher_variables, teacher_sample = None, None, None
  if teacher_cache is not None:  # Zeros of the cached shapes, for the method's init.
    teacher_sample = Output(*teacher_cache.sample_outputs(2))
  elif method.needs_teacher or (is_language_model_run(config) and teacher_checkpoints):
    # A language model's teacher is also loaded for evaluation alone (scratch's agreement and
    # speculative acceptance); the train step runs it only for methods that need it.
    teacher_apply, teacher_variables = teachers_lib.load_teachers(
        config, method, teacher_checkpoints, sample,
        model_kwargs=lambda name: model_kwargs(name, parallel))
    teacher_sample, _ = teacher_apply(teacher_variables, sample, train=False)
  if getattr(method, "selects_examples", False):  # MiniPLM's difference sampling, offline.
    pipeline.restrict_training(method.select_examples(
        pipeline, teacher_apply=teacher_apply, teacher_variables=teacher_variables,
        reference_apply=student_apply))

  if is_language_model_run(config):  # `config.lm.teacher_logits`: computed once, gathered.
    teacher_logits_lib.attach(config, method, pipeline, teacher_apply, teacher_variables)

  student_sample, _ = student_apply(student_variables, sample, train=False)
  label_shape = student_sample.logits.shape[:-1]  # [2] for classifiers, [2, T] for LMs.
  method_params, method_state = method.init(method_rng, Batch(
      student=student_sample, teacher=teacher_sample, labels=np.zeros(label_shape, np.int32),
      where=np.ones(label_shape, bool), step=jnp.zeros((), jnp.int32),
      teacher_variables=teacher_variables, student_variables=student_variables))
  if getattr(method, "pregenerates", False):  # Sequence-level KD's teacher continuations.
    method_state = method.pregenerate(jax.device_get(method_state), pipeline,
                                      teacher_apply=teacher_apply,
                                      teacher_variables=teacher_variables, seed=config.seed)
  optimizer = optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
  initial_state = jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=train_rng))
  return RunParts(pipeline=pipeline, parallel=parallel, method=method,
                  student_apply=student_apply, teacher_apply=teacher_apply,
                  teacher_variables=teacher_variables, optimizer=optimizer,
                  initial_state=initial_state)
