"""What a run trains with, built once from its config (flax's `create_train_state`): the data
pipeline, the parallel strategy, the method, the student and teacher apply functions, the
teacher's variables, the optimizer and the initial train state (on the host)."""

import dataclasses
import os
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as data_lib
from kdjax import paths
from kdjax import methods as methods_lib
from kdjax import models as models_lib
from kdjax.methods.base import Batch, Method, RunFacts
from kdjax.models import precision as precision_lib
from kdjax.models.apply import ApplyFn
from kdjax.teachers import choose as teachers_choose, disk_cache, live
from kdjax.teachers import pretrained as pretrained_lib
from kdjax.teachers.teacher import Teacher
from kdjax.train import optimizer as optimizer_lib
from kdjax.train import parallel as parallel_lib, state as state_lib
from kdjax.train.plan import RunPlan
from kdjax.train.state import TrainState


@dataclasses.dataclass
class RunParts:
  plan: RunPlan
  pipeline: data_lib.InputPipeline
  parallel: Any  # parallel_lib.JitParallel | parallel_lib.PmapParallel
  method: Method
  student_apply: ApplyFn
  teacher: Teacher  # What the train step sees (`kdjax.teachers.choose`).
  eval_teacher: Teacher  # What the eval step compares the student with.
  teacher_variables: Any  # None without a loaded teacher; a list for ensembles.
  teacher_checkpoints: Tuple[str, ...]  # The checkpoints the loaded teacher(s) came from.
  optimizer: optax.GradientTransformation
  initial_state: TrainState  # Host arrays.


def model_kwargs(name: str, parallel) -> dict:
  """BatchNorm models get the pmap axis name (cross-replica statistics under pmap)."""
  if name in models_lib.USES_BATCH_NORM and parallel.batch_norm_axis_name:
    return {"batch_norm_axis_name": parallel.batch_norm_axis_name}
  return {}


def sample_inputs(config: ml_collections.ConfigDict, batch_size: int = 2) -> np.ndarray:
  """Zeros shaped like `batch_size` model inputs of the config's dataset (token windows of
  `config.lm.sequence_length` for text), without opening the data."""
  spec = data_lib.get_dataset_spec(config.dataset)
  if spec.input_kind == "tokens":
    return np.zeros((batch_size, config.lm.sequence_length), np.int32)
  return np.zeros((batch_size,) + tuple(spec.input_shape), np.float32)


def _same_tokenizer(directory_a: str, directory_b: str) -> bool:
  read = lambda d: open(os.path.join(d, "tokenizer.json"), "rb").read()  # pylint: disable=consider-using-with
  return read(directory_a) == read(directory_b)


def _chat_tokenizers(plan: RunPlan):
  """(tokenizer of the batches' tokens, the teacher's own or None): the teacher directory's
  for both models, except for a cross-vocabulary method (`uld`) whose student directory has
  another tokenizer: the student's tokens, and the teacher's tokenization of the same rows."""
  from kdjax.data import chat_data  # pylint: disable=g-import-not-at-top
  from kdjax.methods import uld  # pylint: disable=g-import-not-at-top
  teacher_dir = pretrained_lib.teacher_directory(plan.config)
  student_dir = pretrained_lib.student_directory(plan.config)
  teacher = chat_data.ChatTokenizer.from_directory(teacher_dir)
  if (student_dir and plan.method.name in uld.CROSS_VOCABULARY_METHODS and
      not _same_tokenizer(teacher_dir, student_dir)):
    return chat_data.ChatTokenizer.from_directory(student_dir), teacher
  return teacher, None


def build_pipeline(plan: RunPlan, *, teacher_cache=None):
  """The run's input pipeline: token windows for a text dataset (`config.lm`), else examples
  (with cached teacher outputs joining the training batches when `teacher_cache` is given)."""
  config = plan.config
  common = dict(global_batch_size=config.global_batch_size, seed=config.seed,
                data_dir=config.data_dir or None, process_index=jax.process_index(),
                process_count=jax.process_count(),
                validation_examples=config.validation_examples)
  if plan.language_model:
    if teacher_cache is not None:
      raise ValueError("config.teacher.cache is for classification datasets; a language "
                       "model's teacher runs live.")
    lm = config.lm
    if lm.get("data_file", ""):  # Prompt/completion rows, the teacher directory's tokenizer.
      from kdjax.data import chat_data  # pylint: disable=g-import-not-at-top
      tokenizer, teacher_tokenizer = _chat_tokenizers(plan)
      return chat_data.ChatInputPipeline(
          paths.resolve(lm.data_file), eval_file=paths.resolve(lm.get("eval_file", "")),
          tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
          sequence_length=lm.sequence_length, layout=lm.get("layout", "padded"),
          prompt_length=lm.get("prompt_length", 0), global_batch_size=config.global_batch_size,
          seed=config.seed, process_index=jax.process_index(),
          process_count=jax.process_count(), validation_examples=config.validation_examples)
    return data_lib.LMInputPipeline(
        config.dataset, sequence_length=lm.sequence_length, tokenizer=lm.tokenizer,
        vocab_size=lm.vocab_size or None, tokenizer_dir=lm.tokenizer_dir or None, **common)
  return data_lib.InputPipeline(
      config.dataset, augment=config.augment, teacher_cache=teacher_cache,
      sampler=plan.method.sampler, **common)


def _loaded(checkpoints: Sequence[str], variables) -> Tuple[str, ...]:
  """The checkpoints a loaded teacher came from: each of an ensemble's (variables: a list),
  the first alone, or none."""
  if variables is None:
    return ()
  return tuple(checkpoints[:len(variables) if isinstance(variables, list) else 1])


def _copy_of_teacher(student_variables, teacher_variables, config):
  """The teacher's variables as the student's initial ones, in the student's dtypes; the two
  models must have the same variables (names and shapes)."""
  student_shapes = jax.tree.map(np.shape, student_variables)
  teacher_shapes = jax.tree.map(np.shape, teacher_variables)
  if student_shapes != teacher_shapes:
    raise ValueError(
        f"config.method={config.method!r} starts the student from its teacher, but "
        f"config.student.model={config.student.model!r} and config.teacher.model="
        f"{config.teacher.model!r} have different variables; use one architecture.")
  return jax.tree.map(lambda s, t: np.array(t, dtype=np.asarray(s).dtype),
                      student_variables, jax.device_get(teacher_variables))


def build_run(plan: RunPlan, teacher_checkpoints: Sequence[str]) -> RunParts:
  """Builds the parts of one run from its plan; the teacher is chosen by
  `kdjax.teachers.choose`."""
  config, method_class = plan.config, plan.method
  parallel = parallel_lib.get_parallel(plan.parallel, plan.mesh)
  # Cached teacher outputs (`config.teacher.cache`) join the batches; the teacher is not built.
  teacher_cache = (disk_cache.open_checked(config, sampler=method_class.sampler)
                   if config.teacher.get("cache", "") and method_class.teacher_needs.checkpoint
                   else None)
  pipeline = build_pipeline(plan, teacher_cache=teacher_cache)
  sample = sample_inputs(config)
  kwargs = lambda name: model_kwargs(name, parallel)
  reference_variables = None
  if method_class.reference_field:  # A frozen model of the student's architecture.
    _, (reference_variables,) = live.load_models(
        [config.student.model],
        [paths.resolve(config[method_class.name][method_class.reference_field])],
        num_classes=config.num_classes, sample_inputs=sample, model_kwargs=kwargs)
  method = methods_lib.build_method(config, facts=RunFacts(
      num_train_examples=pipeline.num_train_examples, train_labels=pipeline.train_labels,
      teacher_model=config.teacher.model, reference_variables=reference_variables))

  # `config.dtype`: the student computes in it (train and eval); parameters stay float32.
  student_model = None if pretrained_lib.student_directory(config) else precision_lib.model_fns(
      config.student.model, num_classes=config.num_classes, dtype=config.get("dtype", "float32"),
      **kwargs(config.student.model))
  if pretrained_lib.student_directory(config):  # Starts from a pretrained directory's weights.
    student_model, _ = pretrained_lib.student_model(config)
  student_apply = student_model.apply
  init_rng, method_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  student_variables = jax.device_get(student_model.init(init_rng, sample))
  teacher = teachers_choose.choose_teacher(
      config, method, specs=plan.teachers, checkpoints=teacher_checkpoints,
      cache=teacher_cache, pipeline=pipeline, sample_inputs=sample,
      student_apply=student_apply, model_kwargs=kwargs, language_model=plan.language_model)

  if method_class.student_starts_from_teacher:
    student_variables = _copy_of_teacher(student_variables, teacher.variables, config)
  student_sample, _ = student_apply(student_variables, sample, train=False)
  label_shape = student_sample.logits.shape[:-1]  # [2] for classifiers, [2, T] for LMs.
  method_params, method_state = method.init(method_rng, Batch(
      student=student_sample, teacher=teacher.sample, labels=np.zeros(label_shape, np.int32),
      where=np.ones(label_shape, bool), step=jnp.zeros((), jnp.int32),
      teacher_variables=teacher.variables, student_variables=student_variables))
  method_state = method.pregenerate(jax.device_get(method_state), pipeline,
                                    teacher_apply=teacher.train.apply,
                                    teacher_variables=teacher.variables, seed=config.seed)
  optimizer = optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
  initial_state = jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=train_rng))
  return RunParts(plan=plan, pipeline=pipeline, parallel=parallel, method=method,
                  student_apply=student_apply, teacher=teacher.train,
                  eval_teacher=teacher.eval, teacher_variables=teacher.variables,
                  # A pretrained directory is no kdjax checkpoint (no step, no provenance).
                  teacher_checkpoints=(() if pretrained_lib.teacher_directory(config) else
                                       _loaded(teacher_checkpoints, teacher.variables)),
                  optimizer=optimizer, initial_state=initial_state)
