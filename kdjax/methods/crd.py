"""CRD: contrastive representation distillation with a memory bank (Tian et al., ICLR 2020).

Student and teacher embeddings (taps) go through linear heads to `feat_dim` and are
l2-normalised. Two memory banks of `num_train_examples` rows hold every training example's
last normalised embedding (student bank `memory_student`, teacher bank `memory_teacher`,
indexed by `Batch.data['index']`). Each example is contrasted, through the NCE objective
`losses.crd_nce`, against `nce_k` negatives drawn uniformly from the banks: the teacher's
embedding against the student bank and the student's against the teacher bank, scores
`exp(<v, m> / nce_t) / Z` with `Z` fixed at the first step (as the official code). After the
loss, the banks' rows of the batch move to `normalise(momentum * old + (1 - momentum) * new)`.

Negatives (`negatives`): 'other_class' (default) draws each example's `nce_k` negatives
uniformly, with replacement, from the training examples of the other classes, as RepDistiller's
CIFAR-100 runs ("exact" mode of `CIFAR100InstanceSample`, also mdistiller's `CRD.MODE`); it
needs the training labels (`RunFacts.train_labels`, read in `prepare`). 'uniform'
draws from all examples (the memory's own sampler, the "relax" mode).

Memory (`memory`): 'bank' (the paper's: one row per training example, so it grows with the
dataset: 2 x 50000 x 128 floats on CIFAR-100, 2 x 1.28M x 128 on ImageNet), or 'queue': a
fixed-size FIFO of the last `queue_size` embeddings of each side (MoCo-style), where the
positive is the other side's current embedding of the same example (no gradient) and the
negatives are drawn uniformly from the queue; its size does not depend on the dataset.

Everything is computed on the global batch (`ops.gather`), with negatives drawn from
`Batch.rng`, so every device holds the same banks.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import losses, validation
from kdjax.losses._checks import l2_normalize
from kdjax.methods import base, feature


class CRD(base.Method):
  """`ce_weight * CE + kd_weight * KD + feature_weight * (nce_student + nce_teacher)`.

  Defaults: RepDistiller's `train_student.py` (`-r 1 -a 0 -b 0.8`, `feat_dim` 128,
  `nce_k` 16384, `nce_t` 0.07, `nce_m` 0.5) on the embedding taps.
  """
  name = "crd"
  family = "feature"
  paper = "Tian et al. 2020"
  field_help = {
      "feat_dim": "width of the linear heads the embeddings are projected to",
      "nce_k": "negatives per example",
      "nce_t": "temperature of the NCE scores",
      "nce_momentum": "momentum of the memory rows' update",
      "negatives": "'other_class' (negatives from other classes) or 'uniform' (any example)",
      "memory": "'bank' (one row per training example) or 'queue' (FIFO of queue_size rows)",
      "queue_size": "rows of the 'queue' memory",
  }
  teacher_needs = base.TeacherNeeds(cache="features")
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature", "nce_t")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0, feature_weight=0.8, feat_dim=128,
        nce_k=16384, nce_t=0.07, nce_momentum=0.5, student_tap="embedding",
        teacher_tap="embedding", negatives="other_class", memory="bank", queue_size=16384))

  def __init__(self, config):
    super().__init__(config)
    self.teacher_needs = dataclasses.replace(type(self).teacher_needs,
                                             taps=(config.teacher_tap,))
    self.train_labels = None  # From `prepare` (or set directly), when needs_train_labels.
    base.check_positive_int(config, self.name, "feat_dim")
    base.check_positive_int(config, self.name, "nce_k")
    base.check_interval(config, self.name, "nce_momentum", 0.0, 1.0, high_inclusive=False)
    validation.one_of("config.crd.negatives", config.negatives, NEGATIVES)
    validation.one_of("config.crd.memory", config.memory, MEMORIES)
    base.check_positive_int(config, self.name, "queue_size")
    if config.memory == "queue" and config.nce_k >= config.queue_size:
      raise validation.ConfigError(
          f"config.crd.nce_k={config.nce_k} negatives are drawn from a queue of "
          f"config.crd.queue_size={config.queue_size}; use nce_k < queue_size.")

  def _taps(self, batch):
    """The student and teacher taps, flattened to [b, D]."""
    c, flat = self.config, lambda x: x.reshape(x.shape[0], -1)
    return (flat(feature.feature_tap(batch.student, c.student_tap, "config.crd.student_tap",
                                     "student")),
            flat(feature.feature_tap(batch.teacher, c.teacher_tap, "config.crd.teacher_tap",
                                     "teacher")))

  @property
  def needs_train_labels(self) -> bool:
    return self.config.negatives == "other_class" and self.config.memory == "bank"

  def prepare(self, facts):
    super().prepare(facts)
    # Read here, once: the labels may come from reading the whole split.
    self.train_labels = (facts.train_labels() if self.needs_train_labels
                         and facts.train_labels is not None else None)

  def init(self, rng, sample):
    c = self.config
    student, teacher = self._taps(sample)
    head_rng, student_rng, teacher_rng = jax.random.split(rng, 3)
    head = nn.Dense(c.feat_dim)
    params = {"head_student": head.init(jax.random.fold_in(head_rng, 0), student)["params"],
              "head_teacher": head.init(jax.random.fold_in(head_rng, 1), teacher)["params"]}
    bound = 1.0 / math.sqrt(c.feat_dim / 3)  # The official memory's uniform initialisation.
    memory = lambda key, size: jax.random.uniform(key, (size, c.feat_dim), jnp.float32, -bound,
                                                  bound)
    if c.memory == "queue":
      return params, {"queue_student": memory(student_rng, c.queue_size),
                      "queue_teacher": memory(teacher_rng, c.queue_size),
                      "queue_position": jnp.int32(0),
                      "z_student": jnp.float32(-1.0), "z_teacher": jnp.float32(-1.0)}
    size = self.facts.num_train_examples
    if size is None:
      raise ValueError("crd needs the training split's size for its memory bank; build it with "
                       "build_method(config, num_train_examples=N).")
    if c.nce_k >= size:
      raise ValueError(f"config.crd.nce_k={c.nce_k} negatives need a training split larger than "
                       f"that; this one has {size} examples. Use config.crd.nce_k < {size}.")
    state = {"memory_student": memory(student_rng, size),
             "memory_teacher": memory(teacher_rng, size),
             "z_student": jnp.float32(-1.0), "z_teacher": jnp.float32(-1.0)}
    if self.needs_train_labels:
      state.update(_other_class_tables(self.train_labels, size, c.nce_k))
    return params, state

  def _negatives(self, state, rng, index, labels):
    """[B, nce_k] rows of the memory to contrast each example against."""
    c = self.config
    if c.memory == "queue":
      return jax.random.randint(rng, (index.shape[0], c.nce_k), 0, c.queue_size)
    size = state["memory_student"].shape[0]
    if c.negatives == "uniform":
      return jax.random.randint(rng, (index.shape[0], c.nce_k), 0, size)
    # Uniform over the examples of other classes: a position among the N - count[y] examples
    # outside y's block of the class-sorted order, shifted past that block.
    start = state["class_start"][labels][:, None]
    count = state["class_count"][labels][:, None]
    position = jnp.floor(jax.random.uniform(rng, (index.shape[0], c.nce_k)) *
                         (size - count)).astype(jnp.int32)
    position = jnp.where(position < start, position, position + count)
    return state["class_order"][position]

  def loss(self, params, state, batch, ops):
    c = self.config
    head = nn.Dense(c.feat_dim)
    student, teacher = self._taps(batch)
    v_student = l2_normalize(head.apply({"params": params["head_student"]}, ops.gather(student)))
    v_teacher = l2_normalize(head.apply({"params": params["head_teacher"]}, ops.gather(teacher)))
    index = ops.gather(batch.data["index"])
    where = ops.gather(batch.where)
    labels = ops.gather(batch.labels)
    queue = c.memory == "queue"
    memory_student = state["queue_student" if queue else "memory_student"]
    memory_teacher = state["queue_teacher" if queue else "memory_teacher"]
    size = memory_student.shape[0]
    negatives = self._negatives(state, batch.rng, index, labels)

    def scores(memory, positive_rows, v, z):
      """exp(<m, v> / T) / Z for the positive row and the negatives; Z fixed at step 0."""
      rows = jax.lax.stop_gradient(memory)
      positive_rows = jax.lax.stop_gradient(positive_rows)
      positive = jnp.exp(jnp.sum(positive_rows * v, axis=-1) / c.nce_t)
      negative = jnp.exp(jnp.einsum("bkd,bd->bk", rows[negatives], v) / c.nce_t)
      first_z = jax.lax.stop_gradient(
          (jnp.sum(positive * where) + jnp.sum(negative * where[:, None]))
          / jnp.maximum(jnp.sum(where) * (c.nce_k + 1), 1.0) * size)
      z = jnp.where(z < 0, first_z, z)
      return positive / z, negative / z, z

    def nce(positive, negative):
      per_example = losses.crd_nce(positive, negative, num_data=size, where=where)
      return jnp.sum(per_example) / jnp.maximum(jnp.sum(where), 1.0)

    # The teacher's embedding against the student memory, and the student's against the
    # teacher's. The positive: the bank's row of the same example, or (queue) the other side's
    # current embedding of it.
    positive_for_teacher = v_student if queue else memory_student[index]
    positive_for_student = v_teacher if queue else memory_teacher[index]
    positive_t, negative_t, z_student = scores(memory_student, positive_for_teacher, v_teacher,
                                               state["z_student"])
    positive_s, negative_s, z_teacher = scores(memory_teacher, positive_for_student, v_student,
                                               state["z_teacher"])
    crd = nce(positive_s, negative_s) + nce(positive_t, negative_t)
    loss, metrics = base.ce_term_and_kd(batch, ops, c, {"crd": (c.feature_weight, crd)})

    new_state = dict(state, z_student=z_student, z_teacher=z_teacher)
    if queue:
      # The batch's embeddings replace the oldest entries; padding rows keep the old ones.
      slots = (state["queue_position"] + jnp.arange(index.shape[0])) % size

      def enqueue(memory, v):
        new = jnp.where(where[:, None], jax.lax.stop_gradient(v), memory[slots])
        return memory.at[slots].set(new)

      new_state.update(queue_student=enqueue(memory_student, v_student),
                       queue_teacher=enqueue(memory_teacher, v_teacher),
                       queue_position=(state["queue_position"] + index.shape[0]) % size)
    else:
      def update(memory, v):
        moved = l2_normalize(c.nce_momentum * memory[index]
                             + (1 - c.nce_momentum) * jax.lax.stop_gradient(v))
        # Padding rows keep their old value (their index is a real example's).
        return memory.at[index].set(jnp.where(where[:, None], moved, memory[index]))

      new_state.update(memory_student=update(memory_student, v_student),
                       memory_teacher=update(memory_teacher, v_teacher))
    return loss, metrics, new_state


NEGATIVES = ("other_class", "uniform")
MEMORIES = ("bank", "queue")


def _other_class_tables(train_labels, size: int, nce_k: int) -> dict:
  """The class-sorted order of the training examples and each class's block in it."""
  if train_labels is None:
    raise ValueError(
        "config.crd.negatives='other_class' needs the training labels (set "
        "method.train_labels, as the run does from an in-memory dataset); use "
        "config.crd.negatives='uniform' for datasets read record by record.")
  labels = np.asarray(train_labels).astype(np.int64)
  if labels.shape != (size,):
    raise ValueError(f"crd: train_labels has shape {labels.shape}, expected ({size},).")
  num_classes = int(labels.max()) + 1
  count = np.bincount(labels, minlength=num_classes)
  if np.any(size - count[np.unique(labels)] < 1):
    raise ValueError("config.crd.negatives='other_class' needs at least two classes.")
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  return {"class_order": jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
          "class_start": jnp.asarray(start, jnp.int32),
          "class_count": jnp.asarray(count, jnp.int32)}


METHODS = (CRD,)
