"""Quickstart: distil a 1-D CNN into an MLP on MNIST-1D, offline, in about a minute on 2 cores.

    python -m experiments.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.main --config=configs/quickstart.py:smoke --workdir=/tmp/smoke

Runs: `teacher` (CNN1D from scratch), `scratch` (MLP, labels only), `kd` (Hinton KD, mdistiller
weights CE 0.1 / KD 0.9, T 4) and `dkd` (CE 1, alpha 1, beta 8, T 4, warm-up). MNIST-1D
(Greydanus 2020): 4000 train / 1000 test; the paper reports ~94% for the CNN, ~68% for an MLP.
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.dataset = "mnist1d"
  config.num_classes = 10
  config.student.model = "mlp"
  config.teacher.model = "cnn1d"
  config.global_batch_size = 128
  config.num_steps = 2000
  config.teacher.num_steps = 4000
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 5e-3
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 1000
  config.dkd.warmup_steps = 200
  config.suite = "teacher,scratch,kd,dkd"

  if arg == "smoke":  # Same runs, few steps: checks the whole pipeline in seconds.
    config.num_steps = 40
    config.teacher.num_steps = 60
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
    config.dkd.warmup_steps = 10
  elif arg not in (None, ""):
    raise ValueError(f"Unknown quickstart variant {arg!r}; valid: '' (full), 'smoke'.")
  return config
