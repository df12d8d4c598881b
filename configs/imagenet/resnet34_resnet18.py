"""ImageNet, ResNet-34 -> ResNet-18: KD, DKD and CRD on mdistiller's protocol.

    python -m experiments.import_teacher --model=resnet34 --pth=resnet34-b627a593.pth \
        --num_classes=1000 --out=teachers/resnet34
    python -m experiments.main --config=configs/imagenet/resnet34_resnet18.py:method=kd \
        --workdir=runs/in1k_r34_r18 --config.data_dir=DIR \
        --config.teacher.checkpoint=teachers/resnet34

Needs ImageNet prepared once (`tfds build imagenet2012 --manual_dir=... --data_dir=DIR
--file_format=array_record`) and the torchvision ResNet-34 weights (73.31% top-1) converted
by `experiments.import_teacher` (torchvision's parameter names). Protocol (mdistiller@a08d46f
`configs/imagenet/r34_r18/{kd,dkd,crd}.yaml`): 100 epochs, SGD momentum 0.9, weight decay
1e-4, learning rate divided by 10 at epochs 30, 60 and 90; batch 512 and lr 0.2 (CRD: batch
256, lr 0.1); inception crop 224 + flip, centre crop 224 of the 256-resized image for eval.
KD: CE 0.5 + KD 0.5 at T 1. DKD: CE 1, alpha 1, beta 0.5, T 1, 1-epoch warm-up. CRD: CE 1 +
0.8 NCE, 16384 negatives, momentum 0.5, T 0.07, on the 512-wide embeddings.

Published top-1: scratch 69.76; KD 71.03 (mdistiller) / 71.37 (torchdistill); DKD 71.70;
CRD 71.17 (paper) / 70.93 (torchdistill). Time on one GPU: not measured.

CRD's negatives here are drawn uniformly from all examples (`negatives='uniform'`), where
mdistiller draws them from the other classes: reading every label of a record-by-record
ImageNet would decode 1.28M images, and with 1000 balanced classes a uniform negative is of
the example's own class with probability 0.1%.
"""

from configs import common

TRAIN_EXAMPLES = 1_281_167
EPOCHS = 100
METHODS = ("kd", "dkd", "crd", "scratch")


def get_config(arg=None):
  from configs.cifar100.protocol import parse_arguments  # The same `key=value,...` grammar.
  args = parse_arguments(arg, {"method": "kd", "epochs": str(EPOCHS)})
  if args["method"] not in METHODS:
    raise ValueError(f"Unknown method={args['method']}; this recipe's methods: "
                     f"{', '.join(METHODS)}.")
  method, epochs = args["method"], int(args["epochs"])
  batch_size, learning_rate = (256, 0.1) if method == "crd" else (512, 0.2)
  steps_per_epoch = TRAIN_EXAMPLES // batch_size
  config = common.base_config()
  config.dataset = "imagenet2012"
  config.num_classes = 1000
  config.student.model = "resnet18"
  config.teacher.model = "resnet34"
  config.method = method
  config.suite = method
  config.global_batch_size = batch_size
  config.eval_batch_size = 500
  config.num_steps = epochs * steps_per_epoch
  config.log_every_steps = 100
  config.eval_every_steps = steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_steps = tuple(e * steps_per_epoch for e in (30, 60, 90) if e < epochs)
  config.optimizer.decay_factor = 0.1
  config.kd.update(ce_weight=0.5, kd_weight=0.5, temperature=1.0)
  config.dkd.update(ce_weight=1.0, alpha=1.0, beta=0.5, temperature=1.0,
                    warmup_steps=steps_per_epoch)
  config.crd.update(ce_weight=1.0, kd_weight=0.0, feature_weight=0.8, feat_dim=128,
                    nce_k=16384, nce_momentum=0.5, nce_t=0.07, negatives="uniform")
  return config
