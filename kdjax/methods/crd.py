"""CRD: contrastive representation distillation with a memory bank (Tian et al., ICLR 2020).

Student and teacher embeddings (taps) go through linear heads to `feat_dim` and are
l2-normalised. Two memory banks of `num_train_examples` rows hold every training example's
last normalised embedding (student bank `memory_student`, teacher bank `memory_teacher`,
indexed by `Batch.data['index']`). Each example is contrasted, through the NCE objective
`losses.crd_nce`, against `nce_k` negatives drawn uniformly from the banks: the teacher's
embedding against the student bank and the student's against the teacher bank, scores
`exp(<v, m> / nce_t) / Z` with `Z` fixed at the first step (as the official code). After the
loss, the banks' rows of the batch move to `normalise(momentum * old + (1 - momentum) * new)`.

Everything is computed on the global batch (`ops.gather`), with negatives drawn from
`Batch.rng`, so every device holds the same banks. RepDistiller's CIFAR-100 run draws the
negatives from the examples of *other* classes ("exact" mode of its dataset); this draws them
from all examples (the memory's own uniform sampler), which is not yet the same recipe.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.methods import base, feature


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CRD(base.Method):
  """`ce_weight * CE + kd_weight * KD + feature_weight * (nce_student + nce_teacher)`.

  Defaults: RepDistiller's `train_student.py` (`-r 1 -a 0 -b 0.8`, `feat_dim` 128,
  `nce_k` 16384, `nce_t` 0.07, `nce_m` 0.5) on the embedding taps.
  """
  name = "crd"
  teacher_cache_needs = "features"
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature", "nce_t")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0, feature_weight=0.8, feat_dim=128,
        nce_k=16384, nce_t=0.07, nce_momentum=0.5, student_tap="embedding",
        teacher_tap="embedding"))

  def __init__(self, config):
    super().__init__(config)
    self.teacher_taps = [config.teacher_tap]  # What a teacher cache must hold.
    base.check_positive_int(config, self.name, "feat_dim")
    base.check_positive_int(config, self.name, "nce_k")
    base.check_interval(config, self.name, "nce_momentum", 0.0, 1.0, high_inclusive=False)

  def _taps(self, batch):
    """The student and teacher taps, flattened to [b, D]."""
    c, flat = self.config, lambda x: x.reshape(x.shape[0], -1)
    return (flat(feature.feature_tap(batch.student, c.student_tap, "config.crd.student_tap",
                                     "student")),
            flat(feature.feature_tap(batch.teacher, c.teacher_tap, "config.crd.teacher_tap",
                                     "teacher")))

  def init(self, rng, sample):
    c = self.config
    size = self.num_train_examples
    if size is None:
      raise ValueError("crd needs the training split's size for its memory bank; build it with "
                       "build_method(config, num_train_examples=N).")
    if c.nce_k >= size:
      raise ValueError(f"config.crd.nce_k={c.nce_k} negatives need a training split larger than "
                       f"that; this one has {size} examples. Use config.crd.nce_k < {size}.")
    student, teacher = self._taps(sample)
    head_rng, student_rng, teacher_rng = jax.random.split(rng, 3)
    head = nn.Dense(c.feat_dim)
    params = {"head_student": head.init(jax.random.fold_in(head_rng, 0), student)["params"],
              "head_teacher": head.init(jax.random.fold_in(head_rng, 1), teacher)["params"]}
    bound = 1.0 / math.sqrt(c.feat_dim / 3)  # The official memory's uniform initialisation.
    memory = lambda key: jax.random.uniform(key, (size, c.feat_dim), jnp.float32, -bound, bound)
    state = {"memory_student": memory(student_rng), "memory_teacher": memory(teacher_rng),
             "z_student": jnp.float32(-1.0), "z_teacher": jnp.float32(-1.0)}
    return params, state

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    head = nn.Dense(c.feat_dim)
    student, teacher = self._taps(batch)
    v_student = _normalize(head.apply({"params": params["head_student"]}, ops.gather(student)))
    v_teacher = _normalize(head.apply({"params": params["head_teacher"]}, ops.gather(teacher)))
    index = ops.gather(batch.data["index"])
    where = ops.gather(batch.where)
    size = state["memory_student"].shape[0]
    negatives = jax.random.randint(batch.rng, (index.shape[0], c.nce_k), 0, size)

    def scores(memory, v, z):
      """exp(<m, v> / T) / Z for the positive row and the negatives; Z fixed at step 0."""
      rows = jax.lax.stop_gradient(memory)
      positive = jnp.exp(jnp.sum(rows[index] * v, axis=-1) / c.nce_t)
      negative = jnp.exp(jnp.einsum("bkd,bd->bk", rows[negatives], v) / c.nce_t)
      first_z = jax.lax.stop_gradient(
          (jnp.sum(positive * where) + jnp.sum(negative * where[:, None]))
          / jnp.maximum(jnp.sum(where) * (c.nce_k + 1), 1.0) * size)
      z = jnp.where(z < 0, first_z, z)
      return positive / z, negative / z, z

    def nce(positive, negative):
      per_example = losses.crd_nce(positive, negative, num_data=size, where=where)
      return jnp.sum(per_example) / jnp.maximum(jnp.sum(where), 1.0)

    # The teacher's embedding against the student bank, and the student's against the teacher's.
    positive_t, negative_t, z_student = scores(state["memory_student"], v_teacher,
                                               state["z_student"])
    positive_s, negative_s, z_teacher = scores(state["memory_teacher"], v_student,
                                               state["z_teacher"])
    crd = nce(positive_s, negative_s) + nce(positive_t, negative_t)
    loss = c.ce_weight * ce + c.feature_weight * crd
    metrics = {"ce": ce, "crd": crd}
    if c.kd_weight:
      kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                              temperature=c.temperature, where=batch.where), batch.where)
      loss = loss + c.kd_weight * kd
      metrics["kd"] = kd

    def update(memory, v):
      moved = _normalize(c.nce_momentum * memory[index]
                         + (1 - c.nce_momentum) * jax.lax.stop_gradient(v))
      # Padding rows keep their old value (their index is a real example's).
      return memory.at[index].set(jnp.where(where[:, None], moved, memory[index]))

    new_state = {"memory_student": update(state["memory_student"], v_student),
                 "memory_teacher": update(state["memory_teacher"], v_teacher),
                 "z_student": z_student, "z_teacher": z_teacher}
    return loss, dict(metrics, loss=loss, accuracy=base.accuracy(batch, ops)), new_state

METHODS = (CRD,)
