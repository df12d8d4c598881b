"""CIFAR-100, resnet32x4 -> resnet8x4: the RepDistiller / mdistiller recipe.

    python -m experiments.main --config=configs/cifar100_resnet32x4_resnet8x4.py \
        --workdir=runs/cifar100_r32x4_r8x4 --config.data_dir=DIR

Needs CIFAR-100 prepared offline once (`tfds build cifar100 --data_dir=DIR
--file_format=array_record`). Recipe (Tian et al. 2020; Zhao et al. 2022): 240 epochs, batch 64,
SGD momentum 0.9, lr 0.05, x0.1 at epochs 150/180/210, weight decay 5e-4, random crop + flip.
KD: CE 0.1 + KD 0.9, T 4. DKD: CE 1, alpha 1, beta 8, T 4, 20-epoch warm-up.
Published top-1 (mdistiller, best epoch, mean of 5 runs): KD 73.33, CRD 75.51, DKD 76.32;
DIST reports 76.31 for this pair. Not yet reproduced here: the machine this was written on has
no CIFAR-100 and no GPU.

`:short` keeps everything but trains 2 epochs (a check that the pipeline runs on real data).
"""

from configs import common

TRAIN_EXAMPLES = 50_000
BATCH_SIZE = 64
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE  # 781: the last partial batch is dropped.


def get_config(arg=None):
  config = common.base_config()
  config.dataset = "cifar100"
  config.num_classes = 100
  config.student.model = "resnet8x4"
  config.teacher.model = "resnet32x4"
  config.global_batch_size = BATCH_SIZE
  config.eval_batch_size = 500
  epochs = 2 if arg == "short" else 240
  if arg not in (None, "", "short"):
    raise ValueError(f"Unknown variant {arg!r}; valid: '' (full), 'short'.")
  config.num_steps = epochs * STEPS_PER_EPOCH
  config.log_every_steps = 100
  config.eval_every_steps = 10 * STEPS_PER_EPOCH if epochs > 2 else STEPS_PER_EPOCH
  config.checkpoint_every_steps = STEPS_PER_EPOCH
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_steps = tuple(e * STEPS_PER_EPOCH for e in (150, 180, 210))
  config.optimizer.decay_factor = 0.1
  config.dkd.warmup_steps = 20 * STEPS_PER_EPOCH
  config.ctkd.curriculum_steps = 10 * STEPS_PER_EPOCH
  config.taid.num_train_steps = config.get_ref("num_steps")
  config.suite = "teacher,scratch,kd,dkd,dist"
  return config
