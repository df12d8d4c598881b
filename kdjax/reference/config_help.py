"""Each config field's meaning and valid values, for `--help --config=FILE`.

The run-wide fields are described here, their valid values read from the constants the
validation uses (`config_syntax.PARALLEL_KINDS`, `optimizer.OPTIMIZERS`, ...); a method's
fields (`config.<method>.<field>`) from the method's own declarations (`Method.field_help`).
"""

import dataclasses
from typing import Dict, List, Tuple

from kdjax.data import catalog
from kdjax.data.text_catalog import TEXT_DATASETS
from kdjax.methods import registry
from kdjax.models import precision
from kdjax.reference.methods import field_help
from kdjax.teachers import process_logits
from kdjax.train import config_syntax, optimizer, validate


def _choices(values) -> str:
  return " | ".join(str(v) for v in values)


def _general_fields() -> Dict[str, Tuple[str, str]]:
  """{field path: (meaning, valid values or '')}."""
  datasets = _choices(sorted(catalog.DATASETS) + sorted(TEXT_DATASETS)) + " | a registered name"
  models = "a model of --list=models or a registered one"
  return {
      "dataset": ("the dataset (`--list=datasets`)", datasets),
      "num_classes": ("label classes; for language models the vocabulary size", "integer >= 2"),
      "data_dir": ("where datasets are read and generated ('': $KDJAX_DATA_DIR, "
                   "$TFDS_DATA_DIR or ~/tensorflow_datasets)", "path"),
      "seed": ("the run's seed: initialisation, data order, augmentation", "integer"),
      "seeds": ("every student row over these seeds, mean ± std in the report (empty: seed)",
                "e.g. 0,1,2"),
      "validation_examples": ("training examples held out for model selection", "integer >= 0"),
      "augment": ("the dataset's training augmentation", "True | False"),
      "parallel": ("how the step is spread over devices", _choices(config_syntax.PARALLEL_KINDS)),
      "mesh": ("the 2-D mesh of jit_2d / jit_2d_fsdp ('' otherwise)", "e.g. data=2,model=4"),
      "global_batch_size": ("examples per step over all devices and hosts", "integer >= 1"),
      "eval_batch_size": ("examples per evaluation batch", "integer >= 1"),
      "num_steps": ("optimizer steps of each student run", "integer >= 1"),
      "log_every_steps": ("steps between training-metric lines", "integer >= 1"),
      "eval_every_steps": ("steps between evaluations", "integer >= 1"),
      "checkpoint_every_steps": ("steps between checkpoints", "integer >= 1"),
      "keep_checkpoints": ("checkpoints kept per run", "integer >= 1"),
      "on_nonfinite": ("on a NaN/inf loss: stop the run, or skip the update and count it",
                       _choices(validate.ON_NONFINITE)),
      "progress": ("print a progress line with an ETA while training", "True | False"),
      "prefetch": ("training batches prepared ahead by a thread (0: off)", "integer >= 0"),
      "device_batches": ("make training batches inside the jitted step from data held on the "
                         "devices (mnist1d, cifar10, cifar100)", "True | False"),
      "steps_per_call": ("steps per jitted call with device_batches (intervals must be "
                         "multiples)", "integer >= 1"),
      "allow_config_change": ("rerun into a workdir whose runs used another config (the old "
                              "run is moved aside)", "True | False"),
      "dtype": ("the student's compute dtype (parameters and loss math stay float32)",
                _choices(precision.DTYPES)),
      "method": ("the method of a single run (empty suite)", "a method of --list=methods"),
      "suite": ("comma-separated rows: 'teacher' trains teacher.model, every other entry is a "
                "method training student.model; empty: the one `method`",
                "teacher | teacher_<k> | method names"),
      "sweep": ("one row per value of one method field", "'<method>.<field>=v1,v2,...'"),
      "student.model": ("the student", models),
      "teacher.model": ("the teacher", models),
      "teacher.checkpoint": ("a trained teacher's checkpoints/ directory (default: the suite's "
                             "teacher row)", "path"),
      "teacher.num_steps": ("steps of the suite's teacher runs (0: num_steps)", "integer >= 0"),
      "teacher.extra": ("more teachers for multi-teacher methods",
                        "'model[:checkpoint_dir],...'"),
      "teacher.cache": ("a teacher-output cache (experiments.cache_teacher) read instead of "
                        "running the teacher ('': off)", "path"),
      "teacher.cache_topk": ("top-k logits read from the cache (0: all it holds)", "integer >= 0"),
      "teacher.dtype": ("the frozen teacher's compute and storage dtype",
                        _choices(precision.DTYPES)),
      "teacher.fold_batch_norm": ("fold the teacher's BatchNorms into its convolutions once",
                                  "True | False"),
      "optimizer.name": ("the optimizer", _choices(optimizer.OPTIMIZERS)),
      "optimizer.learning_rate": ("peak learning rate", "number > 0"),
      "optimizer.schedule": ("learning-rate schedule", _choices(optimizer.SCHEDULES)),
      "optimizer.warmup_steps": ("linear warm-up steps", "integer >= 0"),
      "optimizer.weight_decay": ("weight decay (sgd: L2 in the gradient; adamw: decoupled)",
                                 "number >= 0"),
      "optimizer.momentum": ("sgd momentum", "number in [0, 1)"),
      "optimizer.nesterov": ("sgd Nesterov momentum", "True | False"),
      "optimizer.decay_steps": ("schedule 'step': the steps where the rate is multiplied by "
                                "decay_factor", "e.g. 150,180,210"),
      "optimizer.decay_factor": ("schedule 'step': the factor", "number > 0"),
      "lm.sequence_length": ("tokens per training window", "integer >= 2"),
      "lm.tokenizer": ("'byte' (259 tokens) or 'bpe' trained on the training split",
                       "byte | bpe"),
      "lm.vocab_size": ("BPE vocabulary size (0 with 'byte')", "integer >= 0"),
      "lm.tokenizer_dir": ("where the BPE tokenizer is saved ('': <workdir>/tokenizer)", "path"),
      "lm.eval_prompts": ("prompts of the decoding evaluation", "integer >= 0"),
      "lm.eval_prompt_length": ("tokens per evaluation prompt", "integer >= 1"),
      "lm.eval_new_tokens": ("tokens generated per evaluation prompt", "integer >= 1"),
      "lm.speculative_gamma": ("draft tokens per speculative-decoding step", "integer >= 1"),
      "lm.teacher_logits": ("compute the teacher's logits once per process and share them "
                            "between rows ('': live teacher)",
                            _choices(repr(v) if not v else v
                                     for v in process_logits.STORAGE_DTYPES)),
  }


@dataclasses.dataclass(frozen=True)
class FieldHelp:
  path: str
  default: object
  meaning: str
  valid: str


def describe_config(flat: Dict[str, object]) -> List[FieldHelp]:
  """`flat` ({'kd.temperature': 4.0, ...}, `experiments.cli.flat_fields`) with each field's
  meaning and valid values; '' where nothing declares them (a config's own extra field)."""
  general = _general_fields()
  out = []
  for path, default in flat.items():
    meaning, valid = general.get(path, ("", ""))
    head, _, rest = path.partition(".")
    if not meaning and rest and head in registry.METHODS:
      meaning = field_help(registry.METHODS[head], rest) or ""
    out.append(FieldHelp(path, default, meaning, valid))
  return out
