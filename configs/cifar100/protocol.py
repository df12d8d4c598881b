"""The RepDistiller / mdistiller CIFAR-100 protocol, shared by the teacher and student recipes.

Source: megvii-research/mdistiller@a08d46f `configs/cifar100/*.yaml`, `configs/cifar100/dkd/*.yaml`
and `mdistiller/engine/cfg.py`; the same numbers as HobbitLong/RepDistiller `train_student.py`.
240 epochs of batch 64, SGD momentum 0.9, weight decay 5e-4, learning rate 0.05 (0.01 for the
MobileNetV2 and ShuffleNet students) divided by 10 at epochs 150, 180 and 210; random crop
(padding 4) and flip. mdistiller reports the best epoch's test accuracy, mean of 5 runs.
"""

from configs import common

TRAIN_EXAMPLES = 50_000
BATCH_SIZE = 64
# The last partial batch of an epoch is dropped (the anchors keep it: 782 steps per epoch,
# the last of 16 examples; 0.02% of the examples per epoch).
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE
EPOCHS = 240
DECAY_EPOCHS = (150, 180, 210)
# Students trained with the smaller learning rate (mdistiller's dkd/*_mv2, *_shuv1/2 yaml).
LOW_LR_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def learning_rate(student: str) -> float:
  return 0.01 if student in LOW_LR_STUDENTS else 0.05


def base(model: str, *, epochs: int = EPOCHS):
  """The protocol's data, schedule and bookkeeping for a run training `model`."""
  config = common.base_config()
  config.dataset = "cifar100"
  config.num_classes = 100
  config.student.model = model
  config.global_batch_size = BATCH_SIZE
  config.eval_batch_size = 500
  config.num_steps = epochs * STEPS_PER_EPOCH
  config.log_every_steps = 100
  # Every epoch, as the anchors: the best epoch is what their tables report.
  config.eval_every_steps = STEPS_PER_EPOCH
  config.checkpoint_every_steps = STEPS_PER_EPOCH
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = learning_rate(model)
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_steps = tuple(
      e * STEPS_PER_EPOCH for e in DECAY_EPOCHS if e < epochs)
  config.optimizer.decay_factor = 0.1
  return config


def parse_arguments(arg, allowed: dict) -> dict:
  """'teacher=resnet32x4,student=resnet8x4' -> dict; unknown keys or values fail naming them."""
  values = {}
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in allowed:
      raise ValueError(f"Unknown recipe argument {item!r}; arguments: "
                       f"{', '.join(f'{k}=...' for k in allowed)} (comma-separated).")
    values[key] = value
  return {key: values.get(key, default) for key, default in allowed.items()}
