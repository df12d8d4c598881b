"""Whole-config validation, run before any data is prepared or any model compiled.

Every error names the config field, the value given and what is allowed. `validate_config`
returns the run's `RunPlan` (`kdjax.train.plan`): the config's strings parsed once
(`config_syntax`), for everything downstream to read.
"""

import math
import os
from typing import Iterable

import ml_collections

from kdjax import validation
from kdjax.names import did_you_mean
from kdjax.validation import ConfigError
from kdjax.data.catalog import DATASETS, get_dataset_spec
from kdjax.data.sources import default_data_dir
from kdjax.data.text_catalog import TEXT_DATASETS
from kdjax.data import device_batches as device_batches_lib
from kdjax.teachers import disk_cache as teacher_cache_lib
from kdjax.methods.base import check_teacher_cache, overrides
from kdjax.methods.registry import METHODS
from kdjax.models.precision import DTYPES
from kdjax.models.registry import BUILT_IN, MODELS, USES_BATCH_NORM, model_input_kind
from kdjax.train import optimizer as optimizer_lib
from kdjax.train.config_syntax import (PARALLEL_KINDS, mesh_shape, parse_sweep, suite_runs,
                                       suite_seeds, teacher_specs)
from kdjax.train.parallel import check_batch_divisible
from kdjax.train import files
from kdjax.train.checkpoint import CheckpointError, checkpoint_path_problem, unfinished_run
from kdjax.train.plan import RunPlan

ON_NONFINITE = ("stop", "skip")


def _one_of(field: str, value, allowed: Iterable[str]):
  validation.one_of(f"config.{field}", value, allowed)


def _positive_int(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  validation.require(value, validation.POSITIVE_INT, f"config.{field}")




def _refuse_unfinished_teachers(config, specs) -> None:
  """A teacher checkpoint of a run killed before its last step would be distilled from
  silently; it is refused unless `config.teacher.allow_unfinished` says so."""
  if config.teacher.get("allow_unfinished", False):
    return
  for spec in specs:
    if not spec.checkpoint or not os.path.isdir(spec.checkpoint):
      continue
    try:
      unfinished = unfinished_run(spec.checkpoint)
    except CheckpointError as error:
      raise ConfigError(f"config.teacher: {error}") from None
    if unfinished:
      step, num_steps = unfinished
      raise ConfigError(
          f"The teacher checkpoint {spec.checkpoint!r} is at step {step} of its run's "
          f"{num_steps}: that run has not finished. Rerun its command to finish it, or set "
          "config.teacher.allow_unfinished=True to distil from it as it is.")


def check_finite_numbers(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every number in the config is finite: an `inf` temperature or a `nan` learning rate
  would otherwise pass every range check and fail as a non-finite loss at step 1."""
  for key in config.keys():
    value, field = config[key], f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      check_finite_numbers(value, field)
      continue
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{field}={value!r}: every number in a config must be finite.")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> RunPlan:
  """Returns the run's plan; raises ConfigError for the first problem found in the run
  configuration. `config`'s paths must be absolute (`config_paths.resolve_config_paths`)."""
  check_finite_numbers(config)
  _one_of("dataset", config.dataset, list(DATASETS) + list(TEXT_DATASETS))
  _one_of("method", config.method, METHODS)
  _one_of("student.model", config.student.model, MODELS)
  _one_of("teacher.model", config.teacher.model, MODELS)
  _one_of("parallel", config.parallel, PARALLEL_KINDS)
  try:
    mesh = mesh_shape(config.parallel, config.get("mesh", ""), num_devices)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  specs = teacher_specs(config)
  _one_of("on_nonfinite", config.on_nonfinite, ON_NONFINITE)
  _one_of("optimizer.name", config.optimizer.name, optimizer_lib.OPTIMIZERS)
  _one_of("optimizer.schedule", config.optimizer.schedule, optimizer_lib.SCHEDULES)
  for field in ("global_batch_size", "eval_batch_size", "num_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _positive_int(config, field)
  validation.require(config.validation_examples, validation.NON_NEGATIVE_INT,
                     "config.validation_examples")
  # Checked here, under its own name: the suite's teacher run copies it into its num_steps.
  validation.require(config.teacher.get("num_steps", 0) or 0, validation.NON_NEGATIVE_INT,
                     "config.teacher.num_steps")
  validation.require(config.optimizer.learning_rate, validation.POSITIVE,
                     "config.optimizer.learning_rate")
  validation.require(config.optimizer.weight_decay, validation.NON_NEGATIVE,
                     "config.optimizer.weight_decay")
  for field in ("global_batch_size", "eval_batch_size"):
    try:
      check_batch_divisible(config[field], num_devices, f"config.{field}")
    except ValueError as error:
      raise ConfigError(str(error)) from None

  dataset = get_dataset_spec(config.dataset)
  roles = [("student.model", config.student.model)] + [
      ("teacher.model" if i == 0 else "teacher.extra", teacher.model)
      for i, teacher in enumerate(specs)]
  for field, name in roles:
    _one_of(field, name, MODELS)
    if model_input_kind(name) != dataset.input_kind:
      compatible = sorted(m for m in MODELS if model_input_kind(m) == dataset.input_kind)
      raise ConfigError(
          f"config.{field}={name!r} takes {model_input_kind(name)} inputs but dataset "
          f"{config.dataset!r} has {dataset.input_kind} inputs; " + (
              f"models for it: {', '.join(compatible)}." if compatible else
              f"no registered model takes them: register one with input kind "
              f"{dataset.input_kind!r} (docs/bring_your_own.md)."))
  if dataset.train_examples and config.validation_examples >= dataset.train_examples:
    raise ConfigError(f"config.validation_examples={config.validation_examples} must be smaller "
                      f"than the training split of {config.dataset!r} "
                      f"({dataset.train_examples} examples).")
  if dataset.input_kind == "tokens":
    validate_language_model(config, [name for _, name in roles])
  elif config.num_classes != dataset.num_classes:
    raise ConfigError(f"config.num_classes={config.num_classes} but dataset "
                      f"{config.dataset!r} has {dataset.num_classes} classes.")

  # Every method's block is checked, used or not: a typo'd value is an error either way.
  for method_name, method_class in METHODS.items():
    if method_name in config:
      try:
        method_class(config[method_name])
      except ValueError as error:
        raise ConfigError(str(error)) from None

  for spec in specs[1:]:
    if spec.checkpoint and not os.path.isdir(spec.checkpoint):
      raise ConfigError(f"config.teacher.extra names checkpoint {spec.checkpoint!r}, which does "
                        "not exist.")
  teacher_runs = tuple(spec.run for spec in specs)
  runs = tuple(suite_runs(config))
  valid_runs = teacher_runs + tuple(sorted(METHODS))
  for run in runs:
    if run not in METHODS and run not in teacher_runs:
      raise ConfigError(f"config.suite names run {run!r}, which is neither a method nor a "
                        f"teacher run{did_you_mean(run, valid_runs)}; valid runs: "
                        f"{', '.join(valid_runs)}.")

  # The suite-only fields (absent from a run's own config).
  seeds, sweep = suite_seeds(config), parse_sweep(config)

  validation.require(config.get("prefetch", 0), validation.NON_NEGATIVE_INT, "config.prefetch")
  validate_precision(config, specs)
  validate_pretrained(config, specs)
  validate_teacher_cache(config)
  validate_device_batches(config, runs)
  validate_steps_per_call(config)

  teacher_checkpoint = config.teacher.checkpoint
  exported = str(teacher_checkpoint or "").endswith(".msgpack")
  problem = None
  if teacher_checkpoint:
    problem = (("does not exist" if not os.path.isfile(teacher_checkpoint) else None)
               if exported else checkpoint_path_problem(teacher_checkpoint))
  if problem:
    raise ConfigError(f"config.teacher.checkpoint={teacher_checkpoint!r} {problem}; give a "
                      "kdjax run's checkpoints/ directory, an exported model file (.msgpack, "
                      "experiments/export_model.py) or leave it empty to use the suite's "
                      "teacher run.")
  _refuse_unfinished_teachers(config, specs)
  # HOME or KDJAX_DATA_DIR set to a regular file: one line here, not a traceback in TFDS.
  try:
    files.check_directory_path(
        config.data_dir or default_data_dir(),
        "config.data_dir" if config.data_dir else "the data directory ($KDJAX_DATA_DIR, "
        "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
  except files.WorkdirError as error:
    raise ConfigError(str(error)) from None
  return RunPlan(config=config, method=METHODS[config.method], teachers=tuple(specs),
                 rows=runs, seeds=seeds, sweep=sweep, parallel=config.parallel, mesh=mesh,
                 language_model=dataset.input_kind == "tokens", num_devices=num_devices)


def validate_precision(config, specs) -> None:
  """`config.dtype`, `config.teacher.dtype` and `config.teacher.fold_batch_norm` (every
  built-in teacher must then be a model with BatchNorm; a registered one is checked when it
  is loaded, `kdjax.models.fold.fold_model`)."""
  _one_of("dtype", config.get("dtype", "float32"), DTYPES)
  _one_of("teacher.dtype", config.teacher.get("dtype", "float32"), DTYPES)
  fold = config.teacher.get("fold_batch_norm", False)
  if not isinstance(fold, bool):
    raise ConfigError(f"config.teacher.fold_batch_norm must be true or false, got {fold!r}.")
  for i, spec in enumerate(specs if fold else ()):
    if spec.model in BUILT_IN and spec.model not in USES_BATCH_NORM:
      field = "teacher.model" if i == 0 else "teacher.extra"
      raise ConfigError(
          f"config.teacher.fold_batch_norm=True needs teachers with BatchNorm, but "
          f"config.{field}={spec.model!r} has none; models with BatchNorm: "
          f"{', '.join(sorted(USES_BATCH_NORM & BUILT_IN))}.")


def validate_device_batches(config, runs) -> None:
  """`config.device_batches`: a bool; when True, every run of the suite must be one whose
  batches can be made on the devices (`kdjax.data.device_batches.check_supported`)."""
  on = config.get("device_batches", False)
  if not isinstance(on, bool):
    raise ConfigError(f"config.device_batches must be true or false, got {on!r}.")
  if not on:
    return
  for run in runs or [config.method]:
    sampler = METHODS[run].sampler if run in METHODS else "uniform"  # Teacher runs: uniform.
    try:
      device_batches_lib.check_supported(dataset=config.dataset, sampler=sampler,
                                         teacher_cache=config.teacher.get("cache", ""),
                                         parallel=config.parallel)
    except device_batches_lib.DeviceBatchesError as error:
      raise ConfigError(f"{error} (run {run!r})" if sampler != "uniform" else str(error)
                        ) from None


def validate_steps_per_call(config) -> None:
  """`config.steps_per_call`: a positive integer; above 1 it needs device batches (the
  batches of a call are made inside it) and log, eval and checkpoint intervals that are
  multiples of it (the loop acts only between calls)."""
  per_call = config.get("steps_per_call", 1)
  validation.require(per_call, validation.POSITIVE_INT, "config.steps_per_call")
  if per_call == 1:
    return
  if not config.get("device_batches", False):
    raise ConfigError(f"config.steps_per_call={per_call} needs config.device_batches=True "
                      "(the batches of a call are made inside it); or set "
                      "config.steps_per_call=1.")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[field] % per_call:
      raise ConfigError(f"config.{field}={config[field]} is not a multiple of "
                        f"config.steps_per_call={per_call} (the loop logs, evaluates and "
                        "saves between calls); use a multiple of it.")


def validate_teacher_cache(config) -> None:
  """`config.teacher.cache` / `cache_topk`: the cache exists, was written for this run's data,
  seed, batch size, augmentation and teacher, covers `num_steps`, and holds what the method
  learns from (`kdjax.methods.base.check_teacher_cache`)."""
  directory = config.teacher.get("cache", "") or ""
  if not isinstance(directory, str):
    raise ConfigError(f"config.teacher.cache must be a directory path or '' (off), got "
                      f"{directory!r}.")
  validation.require(config.teacher.get("cache_topk", 0), validation.NON_NEGATIVE_INT,
                     "config.teacher.cache_topk")
  method_class = METHODS[config.method]
  needs = method_class.teacher_needs
  if not directory or not needs.checkpoint:
    return
  if needs.ensemble or needs.views or overrides(method_class, "rewrite_batch"):
    raise ConfigError(
        f"config.teacher.cache is set, but method {config.method!r} cannot learn from cached "
        "teacher outputs (its teacher is the student itself, an ensemble, runs on extra views "
        "or on a rewritten batch); leave config.teacher.cache empty for it.")
  meta = teacher_cache_lib.read_meta(directory)
  teacher_cache_lib.check_cache_matches(meta, config, sampler=method_class.sampler,
                                        num_steps=config.num_steps, directory=directory)
  topk = teacher_cache_lib.effective_topk(meta, config.teacher.get("cache_topk", 0))
  try:
    check_teacher_cache(method_class(config[config.method]), topk=topk,
                        num_classes=meta["num_classes"],
                        feature_taps=meta.get("feature_taps", ()))
  except ConfigError as error:
    raise ConfigError(f"config.teacher.cache={directory!r}: {error}") from None


def validate_language_model(config, models) -> None:
  """`config.lm` of a text dataset: the tokenizer, its vocabulary (= `config.num_classes`, the
  models' output size) and the window length, which every model must be able to read."""
  from kdjax.data import tokenization  # pylint: disable=g-import-not-at-top
  from kdjax.models.registry import get_model  # pylint: disable=g-import-not-at-top
  lm = config.get("lm")
  if lm is None:
    raise ConfigError(f"Dataset {config.dataset!r} is a text dataset: the config needs an `lm` "
                      "block (sequence_length, tokenizer, vocab_size), see configs/common.py.")
  _positive_int(config, "lm.sequence_length")
  _one_of("lm.tokenizer", lm.tokenizer, tokenization.TOKENIZERS)
  if lm.tokenizer == "byte":
    vocab_size = tokenization.ByteTokenizer.vocab_size
    if lm.vocab_size not in (0, vocab_size):
      raise ConfigError(f"config.lm.vocab_size={lm.vocab_size} but the byte tokenizer has "
                        f"{vocab_size} tokens; leave it 0 or set {vocab_size}.")
  else:
    _positive_int(config, "lm.vocab_size")
    vocab_size = lm.vocab_size
  if config.num_classes != vocab_size:
    raise ConfigError(f"config.num_classes={config.num_classes} but the {lm.tokenizer} "
                      f"tokenizer has {vocab_size} tokens: a language model's output size is its "
                      f"vocabulary; set config.num_classes={vocab_size}.")
  for name in models:
    max_length = getattr(get_model(name, num_classes=vocab_size), "max_length", None)
    if max_length is not None and lm.sequence_length > max_length:
      raise ConfigError(f"config.lm.sequence_length={lm.sequence_length} is longer than model "
                        f"{name!r} can read (max_length {max_length}); use at most {max_length}.")


def validate_pretrained(config, specs) -> None:
  """`config.teacher.pretrained` / `config.student.pretrained` (Hugging Face-format
  directories, `kdjax.teachers.pretrained`) with the model name 'pretrained', the teacher's
  `pretrained_dtype`, one vocabulary (= `config.num_classes`) for both (the teacher's may
  differ for `uld`, `kdjax.methods.uld.CROSS_VOCABULARY_METHODS`), the window length
  within their positions, and `config.lm.data_file` (prompt/completion rows,
  `kdjax.data.chat_data`), tokenized by the teacher directory's tokenizer."""
  from kdjax.data import chat_data  # pylint: disable=g-import-not-at-top
  from kdjax.methods import uld as uld_method  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained import directory as pretrained_dir  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained import model_entry  # pylint: disable=g-import-not-at-top
  vocab = {}
  for role in ("teacher", "student"):
    directory = config[role].get("pretrained", "") or ""
    named = config[role].model == model_entry.NAME
    if role == "teacher" and named and len(specs) > 1:
      raise ConfigError("config.teacher.extra must be empty with a pretrained teacher "
                        "(one directory, no ensemble).")
    if bool(directory) != named:
      raise ConfigError(f"config.{role}.model={config[role].model!r} with "
                        f"config.{role}.pretrained={directory!r}: a pretrained {role} needs "
                        f"both model 'pretrained' and the directory; set both or neither.")
    if not directory:
      continue
    try:
      hf = pretrained_dir.read_config(directory)
    except ValueError as error:
      raise ConfigError(f"config.{role}.pretrained: {error}") from None
    vocab[role] = hf.vocab_size
    # `uld` compares sorted probabilities, so its teacher may have another vocabulary size
    # (one tokenizer, embeddings padded differently: Qwen2.5-7B's 152064 rows against
    # 0.5B's 151936); the batch's token ids must still be the student's (num_classes).
    # A suite's config is checked for any of its rows; each run's config for its own method.
    methods = suite_runs(config) if config.get("suite") else [config.get("method", "")]
    cross_vocabulary = role == "teacher" and any(
        name in uld_method.CROSS_VOCABULARY_METHODS for name in methods)
    if hf.vocab_size != config.num_classes and not cross_vocabulary:
      raise ConfigError(f"config.{role}.pretrained={directory!r} has vocab_size "
                        f"{hf.vocab_size} but config.num_classes={config.num_classes}; set "
                        f"config.num_classes and config.lm.vocab_size to {hf.vocab_size}.")
    if config.lm.sequence_length > hf.max_position_embeddings:
      raise ConfigError(f"config.lm.sequence_length={config.lm.sequence_length} is longer "
                        f"than config.{role}.pretrained={directory!r} reads "
                        f"(max_position_embeddings {hf.max_position_embeddings}).")
  _one_of("teacher.pretrained_dtype", config.teacher.get("pretrained_dtype", "bfloat16"),
          DTYPES)
  data_file = config.get("lm", {}).get("data_file", "") if "lm" in config else ""
  if not data_file:
    if vocab:
      raise ConfigError("A pretrained teacher or student reads config.lm.data_file (JSONL or "
                        "parquet prompt/completion rows); set it.")
    return
  if "teacher" not in vocab:
    raise ConfigError(f"config.lm.data_file={data_file!r} is tokenized by the teacher "
                      "directory's tokenizer; set config.teacher.pretrained.")
  for field in ("data_file", "eval_file"):
    path = config.lm.get(field, "") or ""
    if path and not os.path.isfile(path):
      raise ConfigError(f"config.lm.{field}={path!r} does not exist; give a .jsonl or "
                        ".parquet file.")
    if path and not path.endswith(chat_data.EXTENSIONS):
      raise ConfigError(f"config.lm.{field}={path!r}: valid file types: "
                        f"{', '.join(chat_data.EXTENSIONS)}.")
  _one_of("lm.layout", config.lm.get("layout", "padded"), chat_data.LAYOUTS)
  prompt_length = config.lm.get("prompt_length", 0)
  if config.lm.get("layout", "padded") == "padded" and not (
      isinstance(prompt_length, int) and 1 <= prompt_length < config.lm.sequence_length):
    raise ConfigError(f"config.lm.prompt_length={prompt_length!r} must be an integer in [1, "
                      f"config.lm.sequence_length={config.lm.sequence_length}) for the "
                      "'padded' layout (each row's prompt is left-padded to it).")
