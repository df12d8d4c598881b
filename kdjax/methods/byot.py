"""BYOT: be your own teacher, self-distillation through auxiliary exits (Zhang et al., "Be Your
Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation", ICCV 2019).

Auxiliary exits (method-owned heads, trained with the student) sit on the student's shallower
taps; the deepest exit, the student's own logits and `embedding`, teaches every shallower
exit. With `e` the exits, `z` the student's logits and `f` its embedding:

  loss = ce_weight * (CE(z) + sum_e CE(z_e))
       + kd_weight * sum_e T^2 KL(softmax(sg(z) / T) || softmax(z_e / T))
       + feature_weight * sum_e mean_b sum_d (f_e - sg(f))^2 [f_e > 0 or sg(f) > 0]

`sg` stops the gradient (the deepest exit learns from the labels only). Defaults from the
official code (luanyunteng/pytorch-be-your-own-teacher `train.py`@8f052ad): `--alpha 0.1`
(kd_weight; the CE terms get `1 - alpha` = 0.9), `--temperature 3`, `--beta 1e-6` on a feature
loss summed over the batch of 128 (`feature_loss_function`), i.e. 1.28e-4 on the per-example
mean used here. The official KD term is the cross-entropy `-T^2 sum p_t log p_e`, which is
the KL above plus the teacher's entropy, a constant for the exits: same gradients, and the
reported `exit_<tap>_kd` is the KL.

Exit heads (`ExitHead`): the official `branchBottleNeck` (1x1 conv to D/4, k x k conv with
stride k, 1x1 conv to D, each followed by BatchNorm and ReLU), global average pooling and a
linear classifier, with D the width of the student's embedding so that the hint compares
like with like. Lighter here: no BatchNorm (a method-owned head then needs no running
statistics in method state and behaves the same in train and eval mode); `k` is the tap's
spatial size over the smallest spatial size among the student's taps of the same layout (the
official 8 / 4 / 2 for ResNet stages 1-3 of 32x32 inputs). Vector taps ([B, D'], an MLP's
hidden layers) get one dense ReLU layer to D, then the classifier.

`exit_taps='auto'` takes the student's `stage<k>` taps but the deepest (which feeds the
embedding, the deepest exit), or, for models without stages, its `hidden<k>` taps but the
last (an MLP's last hidden layer is its embedding). Every exit's top-1 and the ensemble of
all exits (the paper's "Ensemble" row: mean of the softmax outputs of every exit and the
deepest) are reported by `eval_metrics`, from the heads' params in `EvalBatch.method_params`.
"""

import re
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import losses
from kdjax.methods import base, feature
from kdjax.methods.eval_metrics import EvalBatch
from kdjax.models.output import Output


class ExitHead(nn.Module):
  """An auxiliary exit: [B, *spatial, C] or [B, C] -> (features [B, D], logits [B, classes])."""
  features: int
  num_classes: int
  strides: Tuple[int, ...] = ()  # The k x k conv's kernel and stride, one per spatial axis.

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    if x.ndim > 2:
      ones = (1,) * (x.ndim - 2)
      middle = max(self.features // 4, 1)
      x = nn.relu(nn.Conv(middle, ones, name="reduce")(x))
      x = nn.relu(nn.Conv(middle, self.strides, strides=self.strides, padding="VALID",
                          name="downsample")(x))
      x = nn.relu(nn.Conv(self.features, ones, name="expand")(x))
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    else:
      x = nn.relu(nn.Dense(self.features, name="expand")(x))
    return x, nn.Dense(self.num_classes, name="classifier")(x)


def feature_hint(exit_features: jax.Array, deepest_features: jax.Array,
                 where: jax.Array) -> jax.Array:
  """[b] `sum_d (f_e - f)^2 [f_e > 0 or f > 0]` (official `feature_loss_function`, per
  example); rows where `where` is False are 0."""
  keep = where[:, None]
  exit_features = jnp.where(keep, exit_features, 0.0)
  deepest_features = jnp.where(keep, deepest_features, 0.0)
  active = (exit_features > 0) | (deepest_features > 0)
  return jnp.sum(jnp.where(active, (exit_features - deepest_features) ** 2, 0.0), axis=-1)


def _numbered(features, pattern: str) -> List[str]:
  found = [(int(m.group(1)), tap) for tap in features
           for m in [re.fullmatch(pattern, tap)] if m]
  return [tap for _, tap in sorted(found)]


class BYOT(base.Method):
  """Be your own teacher: the student's deepest exit distils into its auxiliary exits."""
  name = "byot"
  family = "self"
  paper = "Zhang et al. 2019"
  field_help = {
      "exit_taps": "the student's taps that get auxiliary exits ('auto': every stage but the "
                   "deepest)",
      "feature_weight": "weight of the exits' feature (hint) term",
      "kd_weight": "weight of the deepest exit's KD into every shallower exit",
      "ce_weight": "weight of the cross-entropy of every exit",
  }
  teacher_needs = base.TeacherNeeds(kind="none")
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=0.9, kd_weight=0.1, temperature=3.0, feature_weight=1.28e-4,
        exit_taps="auto"))

  def __init__(self, config):
    super().__init__(config)
    if not isinstance(config.exit_taps, str) or not config.exit_taps.strip():
      raise ValueError(f"config.byot.exit_taps={config.exit_taps!r}: use 'auto' or "
                       "comma-separated tap names of the student (e.g. 'stage1,stage2').")

  def exit_taps(self, features) -> List[str]:
    """The taps carrying an exit, checked against the student's `features`."""
    value = self.config.exit_taps.strip()
    if value == "auto":
      taps = _numbered(features, r"stage(\d+)")[:-1] or _numbered(features, r"hidden(\d+)")[:-1]
      if not taps:
        raise ValueError(
            "config.byot.exit_taps='auto': the student has no stage<k> or hidden<k> taps "
            "below its deepest; name the exits' taps, e.g. 'block4,block8'; its taps: "
            f"{', '.join(sorted(features))}.")
      return taps
    taps = [tap.strip() for tap in value.split(",") if tap.strip()]
    for tap in taps:
      feature.feature_tap(Output(None, features), tap, "config.byot.exit_taps", "student")
    return taps

  def _heads(self, student) -> Dict[str, ExitHead]:
    features = student.features
    width = _flat(feature.feature_tap(student, "embedding", "config.byot (deepest features)",
                                      "student")).shape[-1]
    heads = {}
    for tap in self.exit_taps(features):
      x = features[tap]
      smallest = [min(f.shape[i] for f in features.values() if f.ndim == x.ndim)
                  for i in range(1, x.ndim - 1)]
      strides = tuple(max(1, size // low) for size, low in zip(x.shape[1:-1], smallest))
      heads[tap] = ExitHead(features=width, num_classes=student.logits.shape[-1],
                            strides=strides)
    return heads

  def init(self, rng, sample):
    return {f"exit_{tap}": head.init(jax.random.fold_in(rng, i), sample.student.features[tap])
            ["params"] for i, (tap, head) in enumerate(self._heads(sample.student).items())}, {}

  def exits(self, params, student, where=None) -> Dict[str, Tuple[jax.Array, jax.Array]]:
    """tap -> (exit features [b, D], exit logits [b, classes]); rows where `where` [b] is
    False see zeros (padding may hold NaN, which would reach the heads' gradients)."""
    take = lambda x: x if where is None else base.mask_rows(x, where)
    return {tap: head.apply({"params": params[f"exit_{tap}"]}, take(student.features[tap]))
            for tap, head in self._heads(student).items()}

  def loss(self, params, state, batch, ops):
    c = self.config
    where = batch.where
    ce = base.cross_entropy(batch, ops)
    deepest_logits = jax.lax.stop_gradient(batch.student.logits)
    deepest_features = jax.lax.stop_gradient(
        _flat(batch.student.features["embedding"]).astype(jnp.float32))
    labels = base.mask_rows(batch.labels, where)
    total_ce, total_kd, total_hint = ce, 0.0, 0.0
    metrics = {"ce": ce}
    for tap, (exit_features, exit_logits) in self.exits(params, batch.student, where).items():
      exit_ce = ops.mean(optax.softmax_cross_entropy_with_integer_labels(
          base.mask_rows(exit_logits, where), labels), where)
      exit_kd = ops.mean(losses.kd(exit_logits, deepest_logits, temperature=c.temperature,
                                   where=where), where)
      exit_hint = ops.mean(feature_hint(exit_features, deepest_features, where), where)
      correct = (jnp.argmax(exit_logits, -1) == batch.labels).astype(jnp.float32)
      metrics.update({f"exit_{tap}_ce": exit_ce, f"exit_{tap}_kd": exit_kd,
                      f"exit_{tap}_hint": exit_hint,
                      f"exit_{tap}_accuracy": ops.mean(correct, where)})
      total_ce, total_kd = total_ce + exit_ce, total_kd + exit_kd
      total_hint = total_hint + exit_hint
    loss = c.ce_weight * total_ce + c.kd_weight * total_kd + c.feature_weight * total_hint
    metrics.update(kd=total_kd, hint=total_hint, loss=loss, accuracy=base.accuracy(batch, ops))
    return loss, metrics, state

  def eval_metrics(self) -> Sequence:
    return (self.exit_accuracies,)

  def exit_accuracies(self, batch: EvalBatch) -> Dict[str, jax.Array]:
    """Sums over the batch: every exit's top-1 (`exit_<tap>_accuracy`) and the ensemble's
    (`exit_ensemble_accuracy`: mean softmax of every exit and the deepest)."""
    if batch.method_params is None:
      raise ValueError("byot's exit metrics need the exits' params: EvalBatch.method_params.")
    sums = {}
    probs = jax.nn.softmax(batch.student.logits.astype(jnp.float32))
    exits = self.exits(batch.method_params, batch.student)
    for tap, (_, logits) in exits.items():
      sums[f"exit_{tap}_accuracy"] = jnp.sum(
          (jnp.argmax(logits, -1) == batch.labels) * batch.where)
      probs = probs + jax.nn.softmax(logits)
    sums["exit_ensemble_accuracy"] = jnp.sum(
        (jnp.argmax(probs, -1) == batch.labels) * batch.where)
    return sums


def _flat(x):
  return x.reshape(x.shape[0], -1)


METHODS = (BYOT,)
