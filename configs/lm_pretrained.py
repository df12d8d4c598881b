"""Distil a pretrained (Hugging Face-format) teacher into a smaller pretrained student on
prompt/completion rows: word-level KD and on-policy GKD, fused losses.

    python -m experiments.main --workdir=runs/lm_pretrained \
        --config=configs/lm_pretrained.py:teacher=/models/Llama-3.2-1B-Instruct,student=/models/Llama-3.2-150M,data=/data/train.jsonl

`teacher=`, `student=` and `data=` may also be given as `--config.teacher.pretrained=`,
`--config.student.pretrained=` and `--config.lm.data_file=`; given in the argument, the
vocabulary (`num_classes`, `lm.vocab_size`) is read from the teacher's config.json.
Data: JSONL or parquet rows `{"prompt", "completion"}` or `{"messages": [...]}` (TRL's formats,
`kdjax/data/chat_data.py`), rendered with the teacher's chat template, loss on completion
tokens only, each prompt left-padded to `lm.prompt_length` so that GKD samples from it.
Teacher in bfloat16 (`teacher.pretrained_dtype`), student float32 master weights.
Rows: `kd` (word-level KD, Kim & Rush 2016; CE 0.5, KD 0.5 at T = 1) and `gkd` (Agarwal et al.
2024: generalized JSD, beta 0.5, on the student's own samples half the time). Both compute the
divergence from hidden states with the vocabulary-chunked losses (`fused='on'`;
`kdjax/methods/lm_fused.py`). `:smoke` is a few steps (tests write a tiny random-weight
teacher/student pair and JSONL file with `kdjax.models.pretrained.tiny`).
"""

import json
import os

from configs import common

SUITE = "kd,gkd"


def _parse(arg):
  fields, variants = {}, []
  for part in str(arg or "").split(","):
    part = part.strip()
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in ("teacher", "student", "data"):
        raise ValueError(f"Unknown lm_pretrained field {key!r}; valid: teacher=DIR, "
                         "student=DIR, data=FILE.")
      fields[key] = value
    elif part:
      if part != "smoke":
        raise ValueError(f"Unknown lm_pretrained variant {part!r}; valid: 'smoke'.")
      variants.append(part)
  return fields, variants


def get_config(arg=None):
  fields, variants = _parse(arg)
  config = common.base_config()
  config.dataset = "pydoc"  # A text dataset: its documents are replaced by config.lm.data_file.
  config.teacher.model = config.student.model = "pretrained"
  config.teacher.pretrained = fields.get("teacher", "")
  config.teacher.pretrained_dtype = "bfloat16"
  config.student.pretrained = fields.get("student", "")
  config.lm.data_file = fields.get("data", "")
  config.lm.eval_file = ""  # '' holds out the last 10% of data_file's rows.
  config.lm.layout = "padded"
  config.lm.sequence_length = 1024
  config.lm.prompt_length = 512
  config.lm.tokenizer = "bpe"  # Not trained: the teacher directory's tokenizer is used.
  # The token ids are the student's (`uld` lets the teacher's vocabulary differ): its
  # directory's vocabulary when given, else the teacher's.
  vocab_size = 0
  source = config.student.pretrained or config.teacher.pretrained
  if source:
    with open(os.path.join(os.path.expanduser(source), "config.json")) as f:
      vocab_size = json.load(f)["vocab_size"]
  config.num_classes = config.lm.vocab_size = vocab_size
  config.suite = SUITE
  config.method = "kd"
  config.global_batch_size = 16
  config.eval_batch_size = 16
  config.num_steps = 1000
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-5  # Fine-tuning a pretrained student (GKD: 1e-5 to 3e-4).
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 50
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 50
  config.eval_every_steps = config.checkpoint_every_steps = 500
  config.kd.ce_weight, config.kd.kd_weight, config.kd.temperature = 0.5, 0.5, 1.0
  config.kd.fused = config.gkd.fused = "on"
  config.gkd.prompt_length = config.lm.get_ref("prompt_length")
  config.gkd.max_new_tokens = 256
  config.lm.eval_prompt_length = config.lm.get_ref("prompt_length")
  if "smoke" in variants:
    config.lm.sequence_length, config.lm.prompt_length = 48, 24
    config.gkd.max_new_tokens = 8
    config.lm.eval_prompts, config.lm.eval_new_tokens, config.lm.speculative_gamma = 2, 4, 2
    config.global_batch_size = config.eval_batch_size = 8
    config.num_steps = 4
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 0
    config.log_every_steps = 1
    config.eval_every_steps = config.checkpoint_every_steps = 4
  return config
