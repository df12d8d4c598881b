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

  config.parallel = "jit"  # jit (mesh + NamedSharding) | pmap | jit_2d | jit_2d_fsdp
  # jit_2d*: the ('data', 'model') mesh, e.g. 'data=2,model=4'; the teacher (jit_2d_fsdp: and
  # the student) is split on 'model' by kdjax/train/sharding_rules.py. Empty for jit / pmap.
  config.mesh = ""
  config.global_batch_size = 128  # Whole batch over all devices and hosts.
  config.eval_batch_size = 1000
  config.num_steps = 1000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.on_nonfinite = "stop"  # stop | skip
  config.progress = True
  config.prefetch = 2  # Training batches prepared and put on the devices ahead; 0 = off.
  # Training batches made inside the jitted step from the training split held on the devices
  # (mnist1d, cifar10, cifar100; kdjax/data/device_batches.py): no host work per step.
  config.device_batches = False
  # With device batches: steps run per jitted call (a lax.scan), for steps shorter than the
  # host's per-call work (a small model on an accelerator). The log, eval and checkpoint
  # intervals must be multiples of it; the numbers equal one step a call up to float rounding.
  config.steps_per_call = 1
  config.allow_config_change = False  # Rerun into a workdir whose runs used another config.
  # The student's compute dtype, train and eval: float32 | bfloat16 (parameters, optimizer
  # and loss math stay float32; kdjax/models/precision.py).
  config.dtype = "float32"

  # student.pretrained: a Hugging Face-format directory the student starts from (model
  # 'pretrained'; float32 master weights).
  config.student = ml_collections.ConfigDict(dict(model="mlp", pretrained=""))
  config.teacher = ml_collections.ConfigDict(dict(
      model="cnn1d",
      checkpoint=config_dict.placeholder(str),  # A run's checkpoints/ dir; default: suite's.
      num_steps=0,  # Steps of the suite's teacher runs; 0 means config.num_steps.
      extra="",  # More teachers for multi-teacher methods: "model[:checkpoint_dir],...".
      # A teacher-output cache (experiments/cache_teacher.py) read instead of running the
      # teacher; '' = off. cache_topk: the top-k logits read from it (0: all it holds).
      cache="",
      cache_topk=0,
      # The frozen teacher's compute dtype (float32 | bfloat16; bfloat16 also stores its
      # variables in bfloat16), and its BatchNorms folded into its convolutions once after
      # loading (linen models with BatchNorm only; kdjax/models/fold.py).
      dtype="float32",
      fold_batch_norm=False,
      # Distil from a teacher checkpoint whose run stopped before its last step (refused
      # by default: a killed teacher run would otherwise be used without a word).
      allow_unfinished=False,
      # A Hugging Face-format directory (Llama, Qwen, Gemma, GPT-2) as the teacher, with
      # model='pretrained' (docs/pretrained.md), computing in `pretrained_dtype`.
      pretrained="",
      pretrained_dtype="bfloat16"))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-2, schedule="cosine", warmup_steps=0, weight_decay=0.0,
      momentum=0.9, nesterov=False, decay_steps=(), decay_factor=0.1))

  # Language models (text datasets only): windows of `sequence_length` tokens; tokenizer 'byte'
  # (259 tokens) or 'bpe' (trained on the training split, `vocab_size` tokens, saved in
  # `tokenizer_dir`, default <workdir>/tokenizer). The generation metrics run at the end of a
  # run with a teacher: `eval_prompts` prompts of `eval_prompt_length` tokens, continued by
  # `eval_new_tokens` tokens, speculative decoding with `speculative_gamma` draft tokens.
  config.lm = ml_collections.ConfigDict(dict(
      sequence_length=128, tokenizer="byte", vocab_size=0, tokenizer_dir="", eval_prompts=16,
      eval_prompt_length=32, eval_new_tokens=32, speculative_gamma=4,
      # Prompt/completion rows (JSONL or parquet, TRL's formats; kdjax/data/chat_data.py) read
      # instead of the dataset's documents, with a pretrained teacher's tokenizer; layout
      # 'padded' (each prompt left-padded to `prompt_length`) or 'packed'.
      data_file="", eval_file="", layout="padded", prompt_length=0))

  config.seeds = ()  # Every student row over these seeds (`<run>/seed<k>/`); empty: config.seed.
  config.sweep = ""  # One row per value of one method field, e.g. 'kd.temperature=1,2,4,8'.
  config.method = "kd"
  config.suite = "teacher,scratch,kd,dkd"  # Comma-separated runs; empty: the one config.method.
  for name, method_config in default_method_configs().items():
    config[name] = method_config
  return config
