"""Fields shared by every experiment config; each experiment overrides what its recipe sets."""

import ml_collections
from ml_collections import config_dict

from kdjax.methods import default_method_configs


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "mnist1d"
  config.num_classes = 10
  config.data_dir = ""  # Empty: $KDJAX_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.seed = 0
  config.validation_examples = 0  # Held out of the training split for model selection.
  config.augment = True  # The dataset's training augmentation (see kdjax/data/catalog.py).

  config.parallel = "jit"  # jit (mesh + NamedSharding) | pmap
  config.global_batch_size = 128  # Whole batch over all devices and hosts.
  config.eval_batch_size = 1000
  config.num_steps = 1000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.on_nonfinite = "stop"  # stop | skip
  config.progress = True
  config.allow_config_change = False  # Rerun into a workdir whose runs used another config.

  config.student = ml_collections.ConfigDict(dict(model="mlp"))
  config.teacher = ml_collections.ConfigDict(dict(
      model="cnn1d",
      checkpoint=config_dict.placeholder(str),  # A run's checkpoints/ dir; default: suite's.
      num_steps=0,  # Steps of the suite's teacher runs; 0 means config.num_steps.
      extra=""))  # More teachers for multi-teacher methods: "model[:checkpoint_dir],...".

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-2, schedule="cosine", warmup_steps=0, weight_decay=0.0,
      momentum=0.9, nesterov=False, decay_steps=(), decay_factor=0.1))

  config.seeds = ()  # Every student row over these seeds (`<run>/seed<k>/`); empty: config.seed.
  config.sweep = ""  # One row per value of one method field, e.g. 'kd.temperature=1,2,4,8'.
  config.method = "kd"
  config.suite = "teacher,scratch,kd,dkd"  # Comma-separated runs; empty: the one config.method.
  for name, method_config in default_method_configs().items():
    config[name] = method_config
  return config
