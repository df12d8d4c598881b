"""CIFAR-100 teachers trained from scratch on the RepDistiller / mdistiller protocol.

    python -m experiments.main --config=configs/cifar100/teacher.py:model=resnet32x4 \
        --workdir=runs/c100_teachers --config.data_dir=DIR

writes `runs/c100_teachers/teacher/checkpoints`, usable as `config.teacher.checkpoint` of
`configs/cifar100/distill.py`. RepDistiller's published teachers (the CRD paper's
teacher accuracies: resnet32x4 79.42, wrn_40_2 75.61, vgg13 74.64, resnet56 72.34, resnet110
74.31, ResNet50 79.34) can be converted instead with `python -m experiments.import_teacher`.
Time on one GPU: not measured.
"""

from configs.cifar100 import protocol

TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "resnet50_cifar")


def get_config(arg=None):
  args = protocol.parse_arguments(arg, {"model": "resnet32x4",
                                        "epochs": str(protocol.EPOCHS)})
  if args["model"] not in TEACHERS:
    raise ValueError(f"Unknown teacher model={args['model']}; the anchors' teachers: "
                     f"{', '.join(TEACHERS)}.")
  config = protocol.base(args["model"], epochs=int(args["epochs"]))
  config.teacher.model = args["model"]
  config.method = "scratch"
  config.suite = "teacher"
  return config
