"""The LM quickstart's teacher: a 4.0M-parameter decoder Transformer on Python's own docs.

    python -m experiments.main --config=configs/lm_teacher.py --workdir=runs/lm_teacher
    python -m experiments.export_model --run_dir=runs/lm_teacher/teacher \
        --out=kdjax/assets/lm_teacher_pydoc.msgpack --dtype=bfloat16

The first command trains `lm_teacher` (6 layers, width 256, 8 heads, RoPE, RMSNorm, SwiGLU) on
the embedded `pydoc` corpus (`pydoc_data.topics`, byte-level tokens, 128-token windows); the
second writes the file that `configs/lm_quickstart.py` loads, so that the quickstart never
has to train it (a teacher trained inside a 10-minute quickstart is too weak to teach
anything). The shipped file's `meta` holds this config and the run's summary
(`kdjax.train.checkpoint.exported_meta`). `:smoke` trains a few steps (tests).
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.dataset = "pydoc"
  config.num_classes = 259  # The byte tokenizer: 256 bytes + PAD, BOS, EOS.
  config.lm.sequence_length = 128
  config.lm.tokenizer = "byte"
  config.teacher.model = "lm_teacher"
  config.student.model = "lm_student"
  config.suite = "teacher"
  config.global_batch_size = 16
  config.eval_batch_size = 64
  config.num_steps = 700
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.warmup_steps = 50
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 25
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 100
  if arg == "smoke":
    config.num_steps = 6
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown lm_teacher variant {arg!r}; valid: '' (full), 'smoke'.")
  return config
