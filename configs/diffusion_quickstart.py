"""Diffusion quickstart: distil the shipped digits teacher into 1-4 step students, offline.

    python -m experiments.main --config=configs/diffusion_quickstart.py --workdir=runs/diff
    python -m experiments.main --config=configs/diffusion_quickstart.py:seeds --workdir=runs/diff_seeds
    python -m experiments.main --config=configs/diffusion_quickstart.py:smoke --workdir=runs/diff_smoke

Each student row's `summary.json` entry carries its sample quality at each of its sampler
settings beside the teacher's best at the same NFE and at its full solve (the methods'
`final_metrics`, `kdjax/diffusion/quality.py`); results.md adds the sample-quality table,
diffusion_fd.png (FD vs NFE) and diffusion_samples.png (see docs/diffusion.md).

Data: scikit-learn's 8x8 digits (`digits`, 1,497 train / 300 held out, in [−1, 1]).
Teacher: `digits_unet` (EDM, 1.0M parameters) from `kdjax/assets/digits_teacher.msgpack`
(`python -m kdjax.diffusion.ship_teacher` docstring: the commands that remake it).
Students: `digits_unet_from_teacher`, the teacher's architecture started from its weights:
  progressive_1..3  Salimans & Ho 2022, DDIM 8 -> 4 -> 2 -> 1 steps, one round per row
  consistency       Song et al. 2023, CD with N = 18, EMA target 0.95, sampled at 1, 2, 4 steps
  dmd               Yin et al. 2024, one-step generator, fake score + regression (weight 1.0)
                    on 1000 teacher Heun-18 pairs
The teacher's numbers (no training): in every row, `eval_teacher_fd_nfe<k>`, the best of
Euler / Heun / DDIM at the row's k NFE, and `eval_teacher_full_fd`, the full 35-NFE Heun solve;
every FD / precision / recall / coverage from the same 1000 fixed noises.
"""

from configs import common

SUITE = "progressive,consistency,dmd"


def get_config(arg=None):
  config = common.base_config()
  config.dataset = "digits"
  config.num_classes = 10  # Conditioning classes (the denoiser ignores it: its output is 8x8x1).
  config.augment = False
  config.teacher.model = "digits_unet"
  # Imported here: kdjax's registries (and so the models' asset paths) come with kdjax.
  from kdjax.diffusion import denoiser_model  # pylint: disable=g-import-not-at-top
  config.teacher.checkpoint = denoiser_model.TEACHER_FILE
  config.student.model = "digits_unet_from_teacher"
  config.suite = SUITE
  config.global_batch_size = 64
  config.eval_batch_size = 300
  config.num_steps = 150
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.log_every_steps = 25
  config.eval_every_steps = 150
  config.checkpoint_every_steps = 75
  config.progressive.teacher_steps = 8
  config.progressive.rounds = 3
  # DMD's λ_reg = 0.25 weighs LPIPS; with L2 here it left the generator unstable at 150 steps
  # (FD 102.4 ± 58.1 over 3 seeds, one seed above the teacher); 1.0: 23.75 ± 2.76 (docs).
  config.dmd.regression_weight = 1.0

  variants = [part.strip() for part in str(arg or "").split(",") if part.strip()]
  for variant in variants:
    if variant not in ("smoke", "seeds"):
      raise ValueError(f"Unknown diffusion_quickstart variant {variant!r}; valid: '' (full), "
                       "'smoke', 'seeds', or both joined by a comma.")
  if "seeds" in variants:
    config.seeds = (0, 1, 2)
  if "smoke" in variants:  # A few steps per row, small sample sets.
    config.num_steps = 4
    config.global_batch_size = 8
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.dmd.num_pairs = 16
    config.dmd.pair_steps = 6  # Heun 2 or 3 from sigma_max diverges at sigma_min (docs).
    config.progressive.teacher_steps = 4
    config.progressive.rounds = 2
    config.consistency.sample_steps = (1, 2)
    for method in ("progressive", "consistency", "dmd"):
      config[method].eval_samples = 40
  return config
