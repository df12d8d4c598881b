"""Quickstart: distil a 1-D CNN into an MLP on MNIST-1D, offline, in a few minutes on 2 cores.

    python -m experiments.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.main --config=configs/quickstart.py:smoke --workdir=runs/smoke
    python -m experiments.main --config=configs/quickstart.py:seeds --workdir=runs/seeds
    python -m experiments.main --config=configs/quickstart.py:self,seeds --workdir=runs/self

`:seeds` runs every student row over seeds 0, 1, 2 (the teacher once) and reports
mean ± std (n) per row; `:smoke,seeds` does so at smoke length. `:self` runs the
self-distillation rows instead (`SELF_DISTILLATION_SUITE`: born_again, ps_kd, cs_kd, tf_kd, byot,
ema_teacher, next to scratch and kd); `:self,seeds` gave, over seeds 0-2 on this machine: scratch
77.6 ± 0.6, kd 80.4 ± 1.0, born_again 78.6 ± 0.5 / 77.0 ± 0.9 (generations 1 / 2; their
ensemble 80.2 ± 0.6), ps_kd 77.7 ± 1.8, cs_kd 71.4 ± 1.4, tf_kd 78.3 ± 1.2, byot 78.4 ± 1.4
(exits' ensemble 79.7 ± 0.6), ema_teacher 76.5 ± 2.7. Any suite takes
`--config.seeds=0,1,2`, a sweep of one hyper-parameter (`--config.sweep=kd.temperature=1,2,4,8`,
one row per value) and born-again generations (`--config.suite=teacher,born_again`, with
`config.born_again.generations` = 2 here: generation 1 learns from the CNN teacher, a
cross-architecture BAN, generation 2 from generation 1).

Runs: `teacher` (CNN1D from scratch), `scratch` (MLP, labels only), and MLPs distilled with
`kd` (Hinton et al. 2015), `dkd` (Zhao et al. 2022), `dist` (Huang et al. 2022), `kd_std`
(KD on standardised logits, Sun et al. 2024), `nkd` (Yang et al. 2023), and from the
teacher's features: `fitnet` (Romero et al. 2015, embedding hint through a linear connector)
`rkd` (Park et al. 2019, distance term on the embeddings) and `crd` (Tian et al. 2020,
contrastive with memory banks).
MNIST-1D (Greydanus 2020): 4000 train / 1000 test; the paper reports ~94% for the CNN and ~68%
for an MLP without augmentation; with the shift/scale/noise augmentation used here the CNN
teacher reaches ~97% and the MLP ~77%.

Recipe choices, measured on this dataset (eval accuracy, seeds 0-3, 2000 steps, lr 0.02):
- KD weights CE 0.5 / KD 0.5 at T 4 gave +1.2 to +3.4 points over scratch on every seed; the
  CIFAR-100 weights of mdistiller (0.1 / 0.9) gave +0.1 to +4.5.
- DKD with beta 0.5 (the DKD paper's ImageNet value) instead of 8 (its CIFAR-100 value): with
  10 classes the NCKD term at beta 8 swamps the task, 65-68% accuracy, while beta 0.5 gives
  77.8-78.9%.
- kd_std with CE weight 1 (kd 9, T 2 as in the paper's code): 79.4%; with CE 0.1 it was 70.5-77.4%.
- nkd with gamma 0.5 (T 1): 77.7%; the official CIFAR-100 setting (T 3, gamma 3.5) gave 63.1%
  and the ImageNet default (gamma 1.5) 74.5%: the non-target term is too strong for 10 classes.
- dist keeps its CIFAR defaults (CE 1, beta 2, gamma 2, T 4): 81.4%.
- fitnet with feature weight 1 instead of RepDistiller's 100 (the teacher of seed 0, student
  seeds 0 / 1): weight 1 gave 83.3 / 85.9%, 10 gave 81.9 / 80.4%, 100 gave 79.8 / 80.6%.
- rkd: the full RKD-DA (distance 25, angle 50) gave 83.9 / 83.0% but its angle term costs B^3
  work, about 50 ms a step at B 128 on 2 CPU cores; the quickstart runs RKD-D (angle weight 0,
  one of the paper's variants), which gave 83.6 / 83.2% at 20x the speed.
- crd with 256 negatives (of 4000 examples; RepDistiller uses 16384 of 50000 on CIFAR-100):
  80.3 / 79.3% (scratch 77.2 / 78.3%); with 1024 negatives 81.2% (seed 0) at a third of the
  speed (87 ms a step).
- DKD and NKD land at scratch's level over seeds 0-2 (0.773 +- 0.018 and 0.773 +- 0.023 against
  0.776 +- 0.006; KD 0.804 +- 0.010): their non-target terms are built for many classes. No
  setting found lifts them (3 seeds each): dkd beta 0.25/1/2/4 -> 0.764/0.749/0.721/0.669,
  dkd temperature 1/2/8 -> 0.772/0.776/0.753, nkd gamma 0.1/0.25/1 -> 0.776/0.777/0.769. They
  stay as the measured result of these methods on 10 classes (docs/quickstart.md).
- For comparison, on the same teacher and student seeds: scratch 77.2 / 78.3%, kd 80.6 / 79.3%;
  sp (weight 3000) 84.4% and pkt (weight 30000) 84.3% on seed 0, RepDistiller's weights as is.
"""

from configs import common


SELF_DISTILLATION_SUITE = "teacher,scratch,kd,born_again,ps_kd,cs_kd,tf_kd,byot,ema_teacher"


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
  config.optimizer.learning_rate = 0.02
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 1000
  config.kd.ce_weight = 0.5
  config.kd.kd_weight = 0.5
  config.dkd.beta = 0.5
  config.dkd.warmup_steps = 200
  config.kd_std.ce_weight = 1.0
  config.nkd.gamma = 0.5
  # References, so that --config.num_steps=N moves these along.
  config.taid.num_train_steps = config.get_ref("num_steps")
  config.ctkd.curriculum_steps = config.get_ref("num_steps") // 24  # Official: 10 of 240 epochs.
  config.fitnet.feature_weight = 1.0
  config.rkd.angle_weight = 0.0  # RKD-D: the angle term is O(B^3), 50 ms a step here.
  config.crd.nce_k = 256  # Negatives per example; 4000 examples in all (16384 on CIFAR).
  # RepDistiller's other-class negatives (the CIFAR recipes') gave 75.9% here against 79.2% for
  # uniform ones (seed 0, same teacher): with 10 classes the bank's same-class rows help.
  config.crd.negatives = "uniform"
  config.born_again.generations = 2
  config.suite = "teacher,scratch,kd,dkd,dist,kd_std,nkd,fitnet,rkd,crd"
  config.ps_kd.num_steps = config.get_ref("num_steps")
  config.ps_kd.steps_per_epoch = 32  # 4000 examples / batch 128 (rounded up).
  config.ps_kd.alpha_T = 0.3  # 0.8 (CIFAR) gave 73.1% against scratch 77.2% here (seed 0).
  config.ema_teacher.num_steps = config.get_ref("num_steps")
  config.ema_teacher.kd_weight, config.ema_teacher.temperature = 0.5, 1.0  # 75.1 vs 73.3% (s0)
  config.tf_kd.kd_weight = 1.0  # The official 10 over-regularises 10 classes: 69.6 vs 77.1% (s0).
  config.dino.num_train_steps = config.get_ref("num_steps")
  config.dino.teacher_warmup_steps = config.get_ref("num_steps") * 3 // 10
  config.dino.out_dim, config.dino.hidden_dim, config.dino.local_crops = 256, 256, 4
  config.cs_kd.kd_weight = 0.3  # lambda 1 gave 66.9% (s0); 0.3: 71.4 +- 1.4 (3 seeds, batch 128).

  variants = [part.strip() for part in str(arg or "").split(",") if part.strip()]
  for variant in variants:
    if variant not in ("smoke", "seeds", "self"):
      raise ValueError(f"Unknown quickstart variant {variant!r}; valid: '' (full), 'smoke', "
                       "'seeds', 'self', or several joined by commas ('self,seeds').")
  if "self" in variants:
    config.suite = SELF_DISTILLATION_SUITE
  if "seeds" in variants:  # Mean ± std over 3 student seeds; the teacher is trained once.
    config.seeds = (0, 1, 2)
  if "smoke" in variants:  # Same runs, few steps: checks the whole pipeline in seconds.
    config.num_steps = 40
    config.teacher.num_steps = 60
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
    config.dkd.warmup_steps = 10
  return config
