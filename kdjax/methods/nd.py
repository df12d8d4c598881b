"""ND: norm and direction distillation (Wang et al. 2023, "Improving Knowledge Distillation via
Regularizing Feature Norm and Direction"; the paper's KD++ recipe).

`ce_weight * CE + kd_weight * KD(T) + feature_weight * losses.nd` on the embeddings: each
student embedding is pushed along the teacher's class centre of its label, with a norm at
least the teacher's.

Class centres. The official code precomputes, once, the teacher's mean embedding per class
over the training split (`center_emb_train.json`, WangYZ1608/Knowledge-Distillation-via-ND
`CIFAR/train_cifar_kd.py` @ `3b2ff1b`). Here the method keeps them as running class means in
its state (`class_sums [K, D]`, `class_counts [K]`, updated from the global batch before the
loss, so every device holds the same centres): from the end of the first epoch they are the
class means of the teacher's embeddings over the whole split (of the augmented views this run
draws, where the official file used the training transform too), with no pass over the data
before training and no file to carry. During the first epoch a class's centre is the mean of
its examples seen so far (always including the current batch's). The teacher's classifier
weights would be another choice of centre; they are not used: they are not what the official
code uses, and a teacher given as cached outputs has no parameters to read.

A student embedding of another width is mapped to the teacher's by a method-owned linear
`connector` (the official `EmbTrans` for students whose width differs); of equal widths, none.
The official KD warm-up (`min(1, epoch / 20)` on the KD term) is not applied.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.losses.norm_direction import nd
from kdjax.methods import base, feature


class ND(feature.FeatureMethod):
  """KD++: defaults from the official CIFAR-100 script (`CIFAR/train_cifar.sh` @ `505de84`,
  resnet56 -> resnet20: `1.0*cls + 1.0*kd + 2.0*nd`, T 4) on the embeddings."""
  name = "nd"
  family = "feature"
  paper = "Wang et al. 2023"
  field_help = {
      "feature_weight": "weight of the norm-and-direction term",
  }
  default_feature_weight = 2.0

  @classmethod
  def default_config(cls):
    config = super().default_config()
    config.kd_weight = 1.0
    return config

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    if len(student_shape) != 2 or len(teacher_shape) != 2:
      raise ValueError(
          f"config.nd.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
          f"config.nd.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: ND needs "
          "embeddings [B, D] on both sides (the 'embedding' taps); a student of another width "
          "gets a linear connector to the teacher's.")

  def init(self, rng, sample):
    super().init(rng, sample)
    num_classes = sample.student.logits.shape[-1]
    params, state = {}, {}
    for i, (_, _, student, teacher) in enumerate(self._pairs(sample)):
      if student.shape[-1] != teacher.shape[-1]:
        params[f"connector{i}"] = nn.Dense(teacher.shape[-1]).init(
            jax.random.fold_in(rng, i), student)["params"]
      state[f"class_sums{i}"] = jnp.zeros((num_classes, teacher.shape[-1]), jnp.float32)
      state[f"class_counts{i}"] = jnp.zeros((num_classes,), jnp.float32)
    return params, state

  def loss(self, params, state, batch, ops):
    c = self.config
    labels = ops.gather(batch.labels)
    where = ops.gather(batch.where)
    new_state, total = {}, 0.0
    for i, (_, _, student, teacher) in enumerate(self._pairs(batch)):
      sums, counts = state[f"class_sums{i}"], state[f"class_counts{i}"]
      # The whole global batch updates the centres: the same on every device.
      one_hot = jax.nn.one_hot(jnp.where(where, labels, -1), sums.shape[0], dtype=sums.dtype)
      embeddings = base.mask_rows(ops.gather(teacher).astype(sums.dtype), where)
      sums = sums + jax.lax.stop_gradient(one_hot.T @ embeddings)
      counts = counts + jnp.sum(one_hot, axis=0)
      new_state[f"class_sums{i}"], new_state[f"class_counts{i}"] = sums, counts
      means = sums / jnp.maximum(counts, 1.0)[:, None]
      if f"connector{i}" in params:
        student = nn.Dense(teacher.shape[-1]).apply({"params": params[f"connector{i}"]},
                                                     base.mask_rows(student, batch.where))
      per_example = nd(student, teacher, means, batch.labels, where=batch.where)
      total = total + ops.mean(per_example, batch.where)
    loss, metrics = base.ce_term_and_kd(batch, ops, c, {self.name: (c.feature_weight, total)})
    return loss, metrics, new_state


METHODS = (ND,)
