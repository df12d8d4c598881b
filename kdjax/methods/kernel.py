"""Kernel-based feature methods: CC (correlation congruence) and NST (neuron selectivity
transfer).

Both are `ce_weight * CE + kd_weight * KD(T) + feature_weight * term` on the taps named in
the config (`student_tap`, `teacher_tap`; several comma-separated pairs are summed), as the
other feature methods (`kdjax.methods.feature.FeatureMethod`).

- `cc`: `losses.correlation_congruence` (the paper's Taylor-approximated Gaussian RBF, not
  RepDistiller's `Correlation`) on the global batch (`ops.gather`), after method-owned linear
  heads that map each flattened tap to `embed_dim`, one for the student and one for the
  teacher, as RepDistiller's CC (`LinearEmbed(dim, feat_dim=128)` on both embeddings,
  HobbitLong/RepDistiller `train_student.py` @ `1143dfe`). Weights: `-b 0.02` (CC) and
  `-b 50` (NST) in `scripts/run_cifar_distill.sh` @ `b0722bc`.
- `nst`: `losses.nst` per example, on every stage (RepDistiller's `feat[1:-1]`); a map larger
  than its partner is average-pooled to the partner's size first, as RepDistiller's `NSTLoss`.
"""

import flax.linen as nn
import jax

from kdjax import validation
from kdjax.losses.kernel import correlation_congruence, nst
from kdjax.methods import base, feature
from kdjax.methods.feature import pool_to_common_size


def check_maps(method: str, student_tap, teacher_tap, student_shape, teacher_shape, what: str):
  """A ValueError naming both taps and shapes unless both are `[B, H, W, C]` maps."""
  if len(student_shape) != 4 or len(teacher_shape) != 4:
    raise ValueError(
        f"config.{method}.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
        f"config.{method}.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: "
        f"{what} needs feature maps [B, H, W, C] on both sides (e.g. 'stage1,stage2,stage3').")


class CC(feature.FeatureMethod):
  """Correlation congruence (Peng et al., ICCV 2019). Defaults: RepDistiller's CIFAR-100 run
  (`-r 1 -a 0 -b 0.02`, `feat_dim` 128, the embeddings) and the paper's kernel (`gamma` 0.4,
  Taylor `order` 2). RepDistiller's 0.02 weighted its own (different) correlation; it is kept
  as the recipe's weight, not re-tuned for the paper's kernel."""
  name = "cc"
  family = "feature"
  paper = "Peng et al. 2019"
  field_help = {
      "embed_dim": "width of the linear heads before the correlation",
      "gamma": "width parameter of the Gaussian-RBF kernel",
      "order": "order of the kernel's Taylor series",
  }
  default_feature_weight = 0.02
  positive_fields = ("temperature", "gamma")

  @classmethod
  def extra_config(cls):
    return dict(gamma=0.4, order=2, embed_dim=128)

  def __init__(self, config):
    super().__init__(config)
    base.check_positive_int(config, self.name, "embed_dim")
    validation.require(config.order, validation.NON_NEGATIVE_INT, "config.cc.order")

  def init(self, rng, sample):
    super().init(rng, sample)
    head = nn.Dense(self.config.embed_dim)
    init = lambda key, x: head.init(key, x.reshape(x.shape[0], -1))["params"]
    params = {}
    for i, (_, _, student, teacher) in enumerate(self._pairs(sample)):
      params[f"head_student{i}"] = init(jax.random.fold_in(rng, 2 * i), student)
      params[f"head_teacher{i}"] = init(jax.random.fold_in(rng, 2 * i + 1), teacher)
    return params, {}

  def term(self, params, pairs, batch, ops):
    c = self.config
    head = nn.Dense(c.embed_dim)
    where = ops.gather(batch.where)
    total = 0.0
    for i, (_, _, student, teacher) in enumerate(pairs):
      # Padding rows may hold NaN: zeroed before the heads (the loss ignores them anyway).
      rows = lambda x: base.mask_rows(ops.gather(x).reshape(where.shape[0], -1), where)
      embed_s = head.apply({"params": params[f"head_student{i}"]}, rows(student))
      embed_t = head.apply({"params": params[f"head_teacher{i}"]}, rows(teacher))
      total = total + correlation_congruence(embed_s, embed_t, gamma=c.gamma, order=c.order,
                                             where=where)
    return total


class NST(feature.FeatureMethod):
  """Neuron selectivity transfer (Huang & Wang 2017): `losses.nst` summed over the stage
  pairs. RepDistiller's CIFAR-100 run: `-r 1 -a 0 -b 50`, every stage (`feat[1:-1]`)."""
  name = "nst"
  family = "feature"
  paper = "Huang & Wang 2017"
  default_student_tap = "stage1,stage2,stage3"
  default_teacher_tap = "stage1,stage2,stage3"
  default_feature_weight = 50.0

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    check_maps(self.name, student_tap, teacher_tap, student_shape, teacher_shape,
               "neuron selectivity transfer")

  def term(self, params, pairs, batch, ops):
    total = 0.0
    for _, _, student, teacher in pairs:
      student, teacher = pool_to_common_size(student, teacher)
      total = total + ops.mean(nst(student, teacher, where=batch.where), batch.where)
    return total


METHODS = (CC, NST)
