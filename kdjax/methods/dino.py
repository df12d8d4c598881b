"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021; official code facebookresearch/dino,
`main_dino.py`, `vision_transformer.py` `DINOHead`, `eval_knn.py`).

The teacher is an exponential moving average of the student: the student's apply function on
variables kept in method state (`self_teacher`), moved after every optimizer step by

  teacher <- m teacher + (1 - m) student,  m = 1 - (1 - m0) (cos(pi step / N) + 1) / 2

(every variable: the parameters and the model state, e.g. BatchNorm statistics, since the
step runs the teacher in eval mode where the official teacher uses batch statistics)

(`momentum_teacher` 0.996 -> 1 over the run's `num_train_steps` N, `utils.cosine_scheduler`).
Every view goes through a projection head owned by the method (`DINOHead`: a 3-layer GELU MLP
to `bottleneck_dim`, l2-normalised, then a weight-normalised linear layer without bias to
`out_dim`, its norm fixed at 1 as `norm_last_layer=True`) on the `embedding` tap; the
teacher's head is the EMA of the student's head, kept in method state with the teacher's
variables. The loss is `losses.dino_cross_entropy` between the teacher's centred and
sharpened outputs on the 2 global views (`losses.dino_center_and_sharpen`, temperature warmed
up linearly from 0.04 to 0.07 over `teacher_warmup_steps`) and the student's on every view
(temperature 0.1), same-view pairs excluded; the centre then follows the teacher's outputs
over the global batch (`losses.dino_update_center`, momentum 0.9).

Multi-crop (`views`): 2 global crops (area fraction in `global_crops_scale` (0.4, 1)) and
`local_crops` local ones (in `local_crops_scale` (0.05, 0.4)), random crop + resize back to
the input size (bilinear; the official local crops are 96 px of 224: here every view keeps
the input size, since the quickstart's models take a fixed input length), aspect ratio in
[3/4, 4/3] for images, for 1-D signals (MNIST-1D) a window of the signal. Drawn in jax.numpy
inside the step from `Batch.rng` and each example's `index`, so a view is a pure function of
(seed, step, example), whatever the device count. The official colour jitter, blur,
solarisation and flips are not reproduced (the data pipeline's own augmentation applies).
Not reproduced either: gradient clipping (3.0 in the official runs) and the frozen last layer
of the first epoch. The l2-normalised bottleneck and weight-normalised last layer give large
raw gradient norms at initialisation (thousands on the quickstart): use a scale-invariant
optimizer (Adam/AdamW, as DINO and the quickstart) or clip.

No class head is trained. Scoring is the official weighted k-NN (`eval_knn.py`: k = 20,
cosine similarity, votes weighted by exp(similarity / 0.07)) of the teacher's eval embedding
(the official code evaluates the teacher). The eval step sees only eval batches, so the
training examples it is scored against are a bank in method state: the l2-normalised teacher
embeddings (of the un-augmented training inputs, in eval mode) and labels of the last
`knn_bank_size` training examples, a FIFO updated from the global batch. This differs from
the official protocol (embeddings of the whole training set by the final teacher): the bank's
rows were computed by slightly older teachers. With `knn_bank_size` >= the training split
(4096 >= MNIST-1D's 4000) it holds every example once the first epoch is over.
"""

import math
from typing import Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import validation
from kdjax.losses import dino as dino_losses
from kdjax.losses._checks import l2_normalize
from kdjax.methods import base, feature
from kdjax.methods.eval_metrics import EvalBatch


class DINOHead(nn.Module):
  """[b, D] -> [b, out_dim]: `vision_transformer.py` `DINOHead` (nlayers 3, no BatchNorm,
  GELU, trunc-normal(0.02) init, weight-normalised last layer with unit norm)."""
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256

  @nn.compact
  def __call__(self, x):
    dense = lambda size, name: nn.Dense(size, kernel_init=nn.initializers.truncated_normal(0.02),
                                        name=name)
    x = nn.gelu(dense(self.hidden_dim, "mlp1")(x.astype(jnp.float32)), approximate=False)
    x = nn.gelu(dense(self.hidden_dim, "mlp2")(x), approximate=False)
    x = l2_normalize(dense(self.bottleneck_dim, "bottleneck")(x))
    direction = self.param("last_layer", nn.initializers.truncated_normal(0.02),
                           (self.bottleneck_dim, self.out_dim))
    return x @ l2_normalize(direction, axis=0)  # Each output unit's weight has norm 1.


def ema_momentum(step, *, start: float, end: float, num_steps: int):
  """`end + (start - end) (1 + cos(pi step / num_steps)) / 2`, `end` after `num_steps`."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def teacher_temperature(step, *, start: float, end: float, warmup_steps: int):
  """Linear from `start` to `end` over `warmup_steps`, then `end` (`DINOLoss`'s schedule)."""
  if warmup_steps == 0:
    return jnp.float32(end)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return start + (end - start) * progress


def _resample(x, axis: int, start, size):
  """`x` [b, n, ...] along `axis`: the window [start, start + size) (fractions of the length,
  [b] each) stretched back to n samples by linear interpolation."""
  n = x.shape[axis]
  position = (start[:, None] + (jnp.arange(n) + 0.5) / n * size[:, None]) * n - 0.5
  position = jnp.clip(position, 0.0, n - 1.0)
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, n - 1)
  weight = position - low
  shape = [x.shape[0]] + [1] * (x.ndim - 1)
  shape[axis] = n

  def take(index):
    return jnp.take_along_axis(x, index.reshape(shape), axis=axis)

  return take(low) * (1 - weight.reshape(shape)) + take(high) * weight.reshape(shape)


def random_resized_crop(inputs, draws, scale) -> jax.Array:
  """One random crop per example, resized to the input size.

  inputs: [b, L] or [b, L, C] signals (a window of `scale` of the length) or [b, H, W, C]
  images (`scale` of the area, aspect ratio log-uniform in [3/4, 4/3], as torchvision's
  `RandomResizedCrop` without its retries). draws: [b, 4] uniform in [0, 1), the crop's
  randomness (size, ratio, position).
  """
  low, high = float(scale[0]), float(scale[1])
  area = low + (high - low) * draws[:, 0]
  x = inputs.astype(jnp.float32)
  if inputs.ndim == 4:
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draws[:, 1]
    width = jnp.minimum(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0)
    height = jnp.minimum(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0)
    x = _resample(x, 1, draws[:, 2] * (1 - height), height)
    x = _resample(x, 2, draws[:, 3] * (1 - width), width)
  else:
    x = _resample(x, 1, draws[:, 2] * (1 - area), area)
  return x.astype(inputs.dtype)


class DINO(base.Method):
  """DINO with an EMA teacher of the student, multi-crop, centring and sharpening."""
  name = "dino"
  family = "self"
  paper = "Caron et al. 2021"
  field_help = {
      "out_dim": "width of the projection head's output",
      "hidden_dim": "hidden width of the projection head",
      "bottleneck_dim": "width of the head's l2-normalised bottleneck",
      "tap": "the feature tap the head reads",
      "local_crops": "number of small crops per example",
      "global_crops_scale": "(min, max) area fraction of the two global crops",
      "local_crops_scale": "(min, max) area fraction of the local crops",
      "student_temperature": "temperature of the student's softmax",
      "teacher_temperature_start": "teacher temperature at step 0",
      "teacher_temperature": "teacher temperature after the warm-up",
      "teacher_warmup_steps": "steps of the teacher temperature's linear warm-up",
      "center_momentum": "momentum of the centre of the teacher's outputs",
      "momentum_start": "EMA momentum of the teacher at step 0",
      "momentum_end": "EMA momentum of the teacher at the last step",
      "knn_k": "neighbours of the k-NN evaluation",
      "knn_temperature": "temperature of the k-NN vote",
      "knn_bank_size": "training embeddings kept for the k-NN evaluation",
  }
  teacher_needs = base.TeacherNeeds(kind="self", views=("global0", "global1"))
  positive_fields = ("student_temperature", "teacher_temperature",
                     "teacher_temperature_start", "knn_temperature")

  @classmethod
  def default_config(cls):
    # Official defaults (main_dino.py) except out_dim (65536 there: a small default that runs
    # anywhere; raise it for real pre-training) and the step-based schedules' lengths.
    return ml_collections.ConfigDict(dict(
        tap="embedding", out_dim=1024, hidden_dim=2048, bottleneck_dim=256,
        local_crops=8, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
        student_temperature=0.1, teacher_temperature_start=0.04, teacher_temperature=0.07,
        teacher_warmup_steps=1000, center_momentum=0.9, momentum_start=0.996,
        momentum_end=1.0, num_train_steps=10000, knn_k=20, knn_temperature=0.07,
        knn_bank_size=4096))

  def __init__(self, config):
    super().__init__(config)
    for field in ("out_dim", "hidden_dim", "bottleneck_dim", "num_train_steps", "knn_k",
                  "knn_bank_size"):
      base.check_positive_int(config, self.name, field)
    for field in ("local_crops", "teacher_warmup_steps"):
      validation.require(config[field], validation.NON_NEGATIVE_INT, f"config.dino.{field}")
    for field in ("center_momentum", "momentum_start", "momentum_end"):
      base.check_interval(config, self.name, field, 0.0, 1.0)
    for field in ("global_crops_scale", "local_crops_scale"):
      value = config[field]
      if (len(value) != 2 or not all(validation.is_number(v) for v in value)
          or not 0 < value[0] <= value[1] <= 1):
        raise validation.ConfigError(
            f"config.dino.{field}={list(value)!r}: must be [low, high] area fractions with "
            "0 < low <= high <= 1.")

  def view_names(self) -> List[str]:
    return list(self.teacher_needs.views) + [f"local{i}" for i in range(self.config.local_crops)]

  def views(self, batch, rng):
    c = self.config
    inputs = batch["inputs"]
    index = batch.get("index", jnp.arange(inputs.shape[0]))
    names = self.view_names()
    # [b, views, 4]: each example's crops from its own key, whatever batch it is in.
    draws = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i),
                                                  (len(names), 4)))(index.astype(jnp.uint32))
    views = {}
    for v, name in enumerate(names):
      scale = c.global_crops_scale if name in self.teacher_needs.views else c.local_crops_scale
      views[name] = random_resized_crop(inputs, draws[:, v], scale)
    return views

  def _head(self):
    c = self.config
    return DINOHead(out_dim=c.out_dim, hidden_dim=c.hidden_dim, bottleneck_dim=c.bottleneck_dim)

  def _embedding(self, output, role):
    x = feature.feature_tap(output, self.config.tap, "config.dino.tap", role)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)

  def init(self, rng, sample):
    if sample.student_variables is None:
      raise ValueError("dino's teacher starts as a copy of the student: init needs "
                       "Batch.student_variables.")
    embedding = self._embedding(sample.student, "student")
    head = self._head().init(rng, embedding)["params"]
    size = self.config.knn_bank_size
    state = {
        "teacher": jax.tree.map(jnp.asarray, sample.student_variables),
        "teacher_head": jax.tree.map(jnp.asarray, head),
        "center": jnp.zeros((self.config.out_dim,), jnp.float32),
        "bank": jnp.zeros((size, embedding.shape[-1]), jnp.float32),
        "bank_labels": jnp.full((size,), -1, jnp.int32),  # -1: an empty row.
        "bank_position": jnp.int32(0),
    }
    return {"head": head}, state

  def teacher_variables_from_state(self, state):
    return state["teacher"]

  def update_after_step(self, state, student_variables, step, *, method_params):
    c = self.config
    m = ema_momentum(step, start=c.momentum_start, end=c.momentum_end,
                     num_steps=c.num_train_steps)
    ema = lambda teacher, student: jax.tree.map(
        lambda t, s: (m * t + (1 - m) * s).astype(t.dtype), teacher, student)
    return dict(state, teacher=ema(state["teacher"], student_variables),
                teacher_head=ema(state["teacher_head"], method_params["head"]))

  def _view_outputs(self, batch):
    """(student Outputs on every view, teacher Outputs on the global views). A caller that
    does not run `views` (the preflight's shape check) gets the plain batch as every view."""
    names = self.view_names()
    if base.STUDENT_VIEW_PREFIX + names[0] not in batch.data:
      return [batch.student] * len(names), [batch.teacher] * len(self.teacher_needs.views)
    return ([batch.data[base.STUDENT_VIEW_PREFIX + n] for n in names],
            [batch.data[base.TEACHER_VIEW_PREFIX + n] for n in self.teacher_needs.views])

  def loss(self, params, state, batch, ops):
    c = self.config
    head = self._head()
    students, teachers = self._view_outputs(batch)
    student_logits = jnp.stack([head.apply({"params": params["head"]},
                                           self._embedding(o, "student")) for o in students])
    teacher_logits = jax.lax.stop_gradient(jnp.stack([
        head.apply({"params": state["teacher_head"]}, self._embedding(o, "teacher"))
        for o in teachers]))
    temperature = teacher_temperature(batch.step, start=c.teacher_temperature_start,
                                      end=c.teacher_temperature,
                                      warmup_steps=c.teacher_warmup_steps)
    targets = dino_losses.dino_center_and_sharpen(teacher_logits, state["center"],
                                                  temperature=temperature)
    dino = ops.mean(dino_losses.dino_cross_entropy(
        student_logits, targets, temperature=c.student_temperature, where=batch.where),
        batch.where)
    where = ops.gather(batch.where)
    # The centre follows the global batch, so every replica holds the same one.
    global_teacher = jnp.swapaxes(ops.gather(jnp.swapaxes(teacher_logits, 0, 1)), 0, 1)
    center = dino_losses.dino_update_center(state["center"], global_teacher,
                                            momentum=c.center_momentum, where=where)
    new_state = dict(state, center=center, **self._bank_update(state, batch, ops, where))
    metrics = {"dino": dino, "loss": dino, "teacher_temperature": temperature,
               "center_norm": jnp.linalg.norm(center),
               "teacher_entropy": ops.mean(-jnp.sum(targets[0] * jnp.log(targets[0] + 1e-12),
                                                    -1), batch.where)}
    return dino, metrics, new_state

  def _bank_update(self, state, batch, ops, where) -> Dict[str, jax.Array]:
    """The k-NN bank after writing the global batch's teacher embeddings (un-augmented)."""
    embedding = l2_normalize(jax.lax.stop_gradient(
        ops.gather(self._embedding(batch.teacher, "teacher"))))
    labels = jnp.where(where, ops.gather(batch.labels), -1)  # Padding rows stay empty.
    size = state["bank"].shape[0]
    embedding, labels = embedding[-size:], labels[-size:]  # A batch larger than the bank.
    slots = (state["bank_position"] + jnp.arange(labels.shape[0])) % size
    return {"bank": state["bank"].at[slots].set(embedding),
            "bank_labels": state["bank_labels"].at[slots].set(labels),
            "bank_position": (state["bank_position"] + labels.shape[0]) % size}

  def eval_metrics(self):
    return (self.knn_accuracy,)

  def knn_accuracy(self, batch: EvalBatch) -> Dict[str, jax.Array]:
    """Sum over the batch of the weighted k-NN's top-1 (`eval_knn.py` `knn_classifier`) of
    the teacher's embedding against the bank."""
    c = self.config
    state = batch.method_state
    output = batch.teacher if batch.teacher is not None else batch.student
    query = l2_normalize(self._embedding(output, "teacher"))
    prediction = knn_predict(query, state["bank"], state["bank_labels"],
                             num_classes=batch.student.logits.shape[-1], k=c.knn_k,
                             temperature=c.knn_temperature)
    return {"knn_accuracy": jnp.sum((prediction == batch.labels) * batch.where)}


def knn_predict(query, bank, bank_labels, *, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> jax.Array:
  """[b] classes voted by the `k` most cosine-similar bank rows, each weighing
  `exp(similarity / temperature)`; rows labelled -1 (empty) never vote.

  query [b, D] and bank [N, D] l2-normalised; bank_labels [N] int.
  """
  valid = bank_labels >= 0
  similarity = jnp.where(valid[None, :], query @ bank.T, -jnp.inf)
  top, rows = jax.lax.top_k(similarity, min(k, bank.shape[0]))
  weight = jnp.where(jnp.isfinite(top), jnp.exp(top / temperature), 0.0)
  votes = jnp.sum(jax.nn.one_hot(bank_labels[rows], num_classes) * weight[..., None], axis=1)
  return jnp.argmax(votes, axis=-1)


METHODS = (DINO,)
