"""LM quickstart: distil a 4.0M-parameter byte-level Transformer into a 0.59M one, offline.

    python -m experiments.main --config=configs/lm_quickstart.py --workdir=runs/lm_quickstart
    python -m experiments.main --config=configs/lm_quickstart.py:seeds --workdir=runs/lm_seeds
    python -m experiments.main --config=configs/lm_quickstart.py:smoke --workdir=runs/lm_smoke

Data: Python's own documentation (`pydoc_data.topics`, shipped with CPython), byte tokens,
128-token windows; train/eval split by topic (`kdjax/data/pydoc_tfds.py`).
Teacher: `lm_teacher` loaded from `kdjax/assets/lm_teacher_pydoc.msgpack`, trained once by
`configs/lm_teacher.py` (its docstring has the two commands that remake the file); `:smoke`
trains a tiny teacher inside the suite instead, so tests need no shipped file.
Students (`lm_student`, all at the same number of steps and batch; a KD step also runs the
teacher's forward pass, so at equal steps KD students used more compute than `scratch`):
  scratch    next-token cross-entropy only
  kd         word-level KD (Hinton et al. 2015 / Kim & Rush 2016): CE and KL to the teacher
  fkl        forward KL only (AdaSPEC's reference model is this run)
  jsd        generalized JSD, beta 0.5 (GKD's divergence, off-policy)
  gkd        on-policy GKD (Agarwal et al. 2024): student samples half the time (lmbda 0.5)
  seq_kd     sequence-level KD (Kim & Rush 2016): CE on the teacher's greedy continuations
  adaspec    AdaSPEC (Hu et al. 2025): forward KL on the 40% of tokens where the draft is
             furthest behind the reference (the fkl run)
`distillm` (Ko et al. 2024, skew KL with adaptive off-policy student samples) and `miniplm`
(Gu et al. 2025, difference sampling against the `scratch` row as reference LM) run in the
`:smoke` suite and by name (`--config.suite=scratch,miniplm`).
Each row reports eval perplexity, per-token agreement with the teacher, and the speculative-
decoding acceptance rate of the student as the teacher's draft model (greedy and sampled,
gamma 4), measured by running speculative decoding (`kdjax/lm/evaluation.py`).
"""

import os

from configs import common

TEACHER_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "kdjax", "assets", "lm_teacher_pydoc.msgpack")
SUITE = "scratch,kd,fkl,jsd,gkd,seq_kd,adaspec"


def get_config(arg=None):
  config = common.base_config()
  config.dataset = "pydoc"
  config.num_classes = 259  # Byte tokenizer.
  config.lm.sequence_length = 128
  config.lm.tokenizer = "byte"
  config.teacher.model = "lm_teacher"
  config.teacher.checkpoint = TEACHER_FILE
  config.student.model = "lm_student"
  config.suite = SUITE
  # Small batches, many steps: at this budget (0.4M training tokens a row) the students are
  # far from converged, and early in training the useful batch size is small: for the same
  # tokens, 8 windows x 600 steps reached eval perplexity 5.77 against 9.32 for 16 x 300.
  # 400 steps, not fewer: at 300 the students are still before the loss's steep drop, and
  # KD's lead in acceptance rate was inside the noise of 16 prompts (seed 0: 0.187 vs 0.203).
  config.global_batch_size = 8
  config.eval_batch_size = 64
  config.num_steps = 400
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.warmup_steps = 40
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.kd.ce_weight, config.kd.kd_weight, config.kd.temperature = 0.5, 0.5, 1.0
  config.gkd.max_new_tokens = 32  # After a 32-token prompt; TRL's default is 128.
  config.gkd.prompt_length = 32
  config.seq_kd.prompt_length = 32
  # Teacher continuations of all 3254 training windows are generated before the first step
  # (~40 s here for 32 tokens; 96 took ~2 min).
  config.seq_kd.max_new_tokens = 32
  # The teacher's logits on every window the rows read, computed once per process and shared
  # by the rows (kd, fkl, jsd, adaspec train from them; every row's evaluations read them):
  # a cached KD step costs about a scratch step (`kdjax/teachers/process_logits.py`; '' = live).
  config.lm.teacher_logits = "float32"
  config.distillm.num_train_steps = config.get_ref("num_steps")
  config.distillm.prompt_length, config.distillm.max_new_tokens = 32, 32

  variants = [part.strip() for part in str(arg or "").split(",") if part.strip()]
  for variant in variants:
    if variant not in ("smoke", "seeds"):
      raise ValueError(f"Unknown lm_quickstart variant {variant!r}; valid: '' (full), "
                       "'smoke', 'seeds', or both joined by a comma.")
  if "seeds" in variants:
    config.seeds = (0, 1, 2)
  if "smoke" in variants:  # A tiny teacher trained in the suite; every row a few steps.
    config.teacher.model = "lm_tiny"
    config.teacher.checkpoint = None
    config.student.model = "lm_tiny"
    config.suite = "teacher," + SUITE + ",distillm,miniplm"
    config.lm.sequence_length = 32
    config.gkd.prompt_length = config.seq_kd.prompt_length = 8
    config.gkd.max_new_tokens = config.seq_kd.max_new_tokens = 8
    config.distillm.prompt_length = config.distillm.max_new_tokens = 8
    config.distillm.init_threshold = 0.5  # Exercise every data source in a few steps.
    config.distillm.capacity = 16
    config.lm.eval_prompts, config.lm.eval_prompt_length = 4, 8
    config.lm.eval_new_tokens, config.lm.speculative_gamma = 8, 2
    config.global_batch_size = 8
    config.num_steps = 6
    config.teacher.num_steps = 12  # Not the students' 6 steps from the same initialisation.
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 3
  return config
