"""CIFAR-100 distillation, every teacher/student pair and method of the RepDistiller / mdistiller
tables, on their protocol (`configs/cifar100/protocol.py`).

    python -m experiments.main \
        --config=configs/cifar100/distill.py:teacher=resnet32x4,student=resnet8x4,method=kd \
        --workdir=runs/c100_r32x4_r8x4 --config.data_dir=DIR \
        --config.teacher.checkpoint=TEACHER_DIR

The teacher comes from `configs/cifar100/teacher.py` (trained here) or from RepDistiller's
published `.pth` files converted by `python -m experiments.import_teacher`. Without
`config.teacher.checkpoint`, the suite trains the teacher first (`suite = teacher,<method>`)
with the student's optimizer settings; for the MobileNetV2/ShuffleNet students (learning rate
0.01) train the teacher with `configs/cifar100/teacher.py` instead, as the anchors do.
Needs CIFAR-100 prepared once (`tfds build cifar100 --data_dir=DIR --file_format=array_record`).

Arguments (after ':', comma-separated): `teacher`, `student`, `method` (any kdjax method; the
hyper-parameters below are the anchors' for the methods they publish, kdjax's defaults
otherwise), `epochs` (240; `epochs=2` is a short check that the pipeline runs on real data).

Published top-1 (mdistiller README, best epoch, mean of 5 runs; `PUBLISHED` below):
resnet32x4 -> resnet8x4 KD 73.33, CRD 75.51, DKD 76.32; the full table is in `PUBLISHED`.
Time on one GPU: not measured (this was written on a 2-core CPU machine without CIFAR-100).
"""

from configs.cifar100 import protocol

# (teacher, student) -> {method: published top-1}, mdistiller README (CIFAR-100 tables).
PUBLISHED = {
    ("resnet56", "resnet20"): {"kd": 70.66, "crd": 71.16, "dkd": 71.97},
    ("resnet110", "resnet32"): {"kd": 73.08, "crd": 73.48, "dkd": 74.11},
    ("resnet32x4", "resnet8x4"): {"kd": 73.33, "crd": 75.51, "dkd": 76.32},
    ("wrn_40_2", "wrn_16_2"): {"kd": 74.92, "crd": 75.48, "dkd": 76.23},
    ("wrn_40_2", "wrn_40_1"): {"kd": 73.54, "crd": 74.14, "dkd": 74.81},
    ("vgg13", "vgg8"): {"kd": 72.98, "crd": 73.94, "dkd": 74.68},
    ("resnet32x4", "shufflenetv1"): {"kd": 74.07, "crd": 75.11, "dkd": 76.45},
    ("wrn_40_2", "shufflenetv1"): {"kd": 74.83, "crd": 76.05, "dkd": 76.70},
    ("vgg13", "mobilenetv2"): {"kd": 67.37, "crd": 69.73, "dkd": 69.71},
    ("resnet50_cifar", "mobilenetv2"): {"kd": 67.35, "crd": 69.11, "dkd": 70.35},
    ("resnet32x4", "shufflenetv2"): {},
}

# DKD's beta per pair (mdistiller configs/cifar100/dkd/<pair>.yaml; 8 where the file keeps
# the default of cfg.py).
DKD_BETA = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
}


def get_config(arg=None):
  args = protocol.parse_arguments(arg, {"teacher": "resnet32x4", "student": "resnet8x4",
                                        "method": "kd", "epochs": str(protocol.EPOCHS)})
  pair = (args["teacher"], args["student"])
  if pair not in PUBLISHED:
    raise ValueError(f"Unknown pair teacher={pair[0]},student={pair[1]}; the anchors' pairs: "
                     + "; ".join(f"teacher={t},student={s}" for t, s in PUBLISHED) + ".")
  try:
    epochs = int(args["epochs"])
  except ValueError:
    raise ValueError(f"epochs={args['epochs']!r} is not a whole number.") from None
  config = protocol.base(args["student"], epochs=epochs)
  config.teacher.model = args["teacher"]
  config.method = args["method"]
  config.suite = f"teacher,{args['method']}"
  config.teacher.num_steps = epochs * protocol.STEPS_PER_EPOCH
  epoch = protocol.STEPS_PER_EPOCH
  # Hyper-parameters of mdistiller's cfg.py (and the per-pair yaml files).
  config.kd.update(ce_weight=0.1, kd_weight=0.9, temperature=4.0)
  config.dkd.update(ce_weight=1.0, alpha=1.0, beta=DKD_BETA.get(pair, 8.0), temperature=4.0,
                    warmup_steps=20 * epoch)
  config.crd.update(ce_weight=1.0, kd_weight=0.0, feature_weight=0.8, feat_dim=128,
                    nce_k=16384, nce_momentum=0.5, nce_t=0.07)
  config.fitnet.update(ce_weight=1.0, feature_weight=100.0, student_tap="stage2",
                       teacher_tap="stage2",  # HINT_LAYER 2: the second stage's output,
                       connector="conv_reg")  # through RepDistiller's ConvReg.
  config.at.update(ce_weight=1.0, feature_weight=1000.0, p=2.0)
  config.sp.update(ce_weight=1.0, feature_weight=3000.0)
  config.rkd.update(ce_weight=1.0, feature_weight=1.0, distance_weight=25.0, angle_weight=50.0)
  config.pkt.update(ce_weight=1.0, feature_weight=30000.0)
  config.ctkd.curriculum_steps = 10 * epoch
  config.taid.num_train_steps = config.get_ref("num_steps")
  return config
