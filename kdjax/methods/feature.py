"""Feature and relational feature distillation: FitNets, AT, SP, RKD, PKT.

Each method is `ce_weight * CE + kd_weight * KD(T) + feature_weight * term`, the term
computed on feature taps named in the method's config (`student_tap`, `teacher_tap`; several
comma-separated pairs are summed, e.g. AT over stages). Defaults follow RepDistiller's CIFAR-100
runs of these methods ("w/o KD": `-r 1 -a 0 -b <beta>`, `train_student.py` and its README).
Relational terms (SP, RKD, PKT) see the global batch through `ops.gather`, so one device and
N devices give the same number. FitNets' connector (a linear map of the student's channels
to the teacher's: a 1x1 conv on maps, a dense layer on embeddings) is a parameter of the method,
trained with the student and checkpointed.
"""

import dataclasses
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses, validation
from kdjax.methods import base


def _names(value: str) -> List[str]:
  return [name.strip() for name in str(value).split(",") if name.strip()]


class FeatureMethod(base.Method):
  """Base of the feature methods; subclasses set `name`, the defaults and `term`."""

  teacher_needs = base.TeacherNeeds(cache="features")
  default_student_tap: ClassVar[str] = "embedding"
  default_teacher_tap: ClassVar[str] = "embedding"
  default_feature_weight: ClassVar[float] = 1.0
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0,
        feature_weight=cls.default_feature_weight, student_tap=cls.default_student_tap,
        teacher_tap=cls.default_teacher_tap, **cls.extra_config()))

  @classmethod
  def extra_config(cls) -> Dict:
    return {}

  def __init__(self, config):
    super().__init__(config)
    self.student_taps = _names(config.student_tap)
    self.teacher_taps = _names(config.teacher_tap)
    self.teacher_needs = dataclasses.replace(type(self).teacher_needs,
                                             taps=tuple(self.teacher_taps))
    if not self.student_taps or len(self.student_taps) != len(self.teacher_taps):
      raise ValueError(
          f"config.{self.name}.student_tap={config.student_tap!r} and "
          f"config.{self.name}.teacher_tap={config.teacher_tap!r} must name the same number "
          "(at least one) of comma-separated taps, paired in order.")

  def _pairs(self, batch: base.Batch) -> List[Tuple[str, str, jnp.ndarray, jnp.ndarray]]:
    pairs = []
    for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
      pairs.append((student_tap, teacher_tap,
                    feature_tap(batch.student, student_tap, f"config.{self.name}.student_tap",
                         "student"),
                    feature_tap(batch.teacher, teacher_tap, f"config.{self.name}.teacher_tap",
                         "teacher")))
    return pairs

  def init(self, rng, sample):
    for student_tap, teacher_tap, student, teacher in self._pairs(sample):
      self.check_pair(student_tap, teacher_tap, student.shape, teacher.shape)
    return {}, {}

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    """Raises ValueError, naming both shapes, for a pair the term cannot compare."""

  def term(self, params, pairs, batch: base.Batch, ops: base.BatchOps) -> jnp.ndarray:
    """The feature term (before `feature_weight`) for the (tap, tap, student, teacher)
    `pairs` of this batch. Subclasses define it, or override `loss` when the term also
    updates method state (FitNet's ConvReg BatchNorm, ND's class centres)."""
    raise TypeError(f"{type(self).__name__} defines neither `term` nor its own `loss`.")

  def loss(self, params, state, batch, ops):
    c = self.config
    term = self.term(params, self._pairs(batch), batch, ops)
    loss, metrics = base.ce_term_and_kd(batch, ops, c, {self.name: (c.feature_weight, term)})
    return loss, metrics, state


def feature_tap(output, tap: str, field: str, role: str):
  """`output.features[tap]`, or a ValueError naming `field` and the taps that exist."""
  if tap not in output.features:
    raise ValueError(f"{field}={tap!r}: the {role} model has no such tap; its taps: "
                     f"{', '.join(sorted(output.features))}.")
  return output.features[tap]


def _per_example_term(loss_fn: Callable, pairs, batch, ops, transform=lambda i, s: s):
  total = 0.0
  for i, (_, _, student, teacher) in enumerate(pairs):
    total = total + ops.mean(loss_fn(transform(i, student), teacher, where=batch.where),
                             batch.where)
  return total


def _relational_term(loss_fn: Callable, pairs, batch, ops):
  where = ops.gather(batch.where)
  return sum(loss_fn(ops.gather(student), ops.gather(teacher), where=where)
             for _, _, student, teacher in pairs)


def pool_to_common_size(student: jax.Array, teacher: jax.Array):
  """The larger of two `[B, H, W, C]` maps average-pooled to the other's `(H, W)`, as
  RepDistiller's AT, NST and VID losses do (`F.adaptive_avg_pool2d`); other ranks pass."""
  from kdjax.losses.class_attention import adaptive_average_pool  # pylint: disable=g-import-not-at-top
  if student.ndim != 4 or teacher.ndim != 4 or student.shape[1:3] == teacher.shape[1:3]:
    return student, teacher
  if student.shape[1] * student.shape[2] > teacher.shape[1] * teacher.shape[2]:
    return adaptive_average_pool(student, tuple(teacher.shape[1:3])), teacher
  return student, adaptive_average_pool(teacher, tuple(student.shape[1:3]))


class ConvRegressor(nn.Module):
  """RepDistiller's `ConvReg` (`models/util.py`), FitNets' regressor between maps of different
  sizes: a 3x3 stride-2 conv when the student map is twice the teacher's, a 4x4 stride-2
  transposed conv when it is half, a `(1 + H_s - H_t)` valid conv when it is larger, then
  BatchNorm and ReLU. `[b, H_s, W_s, C_s]` -> `[b, H_t, W_t, channels]`. `norm` builds the
  BatchNorm (`BatchOps.batch_norm`: statistics over the global batch under pmap)."""
  channels: int
  teacher_size: Tuple[int, int]
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    (s_h, s_w), (t_h, t_w) = x.shape[1:3], self.teacher_size
    if (s_h, s_w) == (2 * t_h, 2 * t_w):
      x = nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])(x)
    elif (2 * s_h, 2 * s_w) == (t_h, t_w):
      x = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding="SAME")(x)
    elif s_h >= t_h and s_w >= t_w:
      x = nn.Conv(self.channels, (1 + s_h - t_h, 1 + s_w - t_w), padding="VALID")(x)
    else:
      raise ValueError(f"ConvRegressor: a student map of {s_h}x{s_w} cannot be regressed to a "
                       f"teacher map of {t_h}x{t_w} (RepDistiller's ConvReg neither).")
    x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)


class FitNet(FeatureMethod):
  """FitNets (Romero et al., ICLR 2015): hint loss `losses.fitnet` between the connected
  student tap and the teacher tap. RepDistiller: `-b 100`, hint layer 2 (`stage2` of the
  CIFAR ResNets) through `ConvReg` (`connector='conv_reg'`, which also bridges maps of half or
  twice the teacher's size: the ShuffleNet / MobileNet pairs); the default taps are the
  embeddings, which every model has, with a linear connector (`connector='linear'`: a dense
  layer on the channel axis, no normalisation)."""
  name = "fitnet"
  family = "feature"
  paper = "Romero et al. 2015"
  field_help = {
      "connector": "the student-side map to the teacher's width: 'linear' or 'conv_reg'",
  }
  default_feature_weight = 100.0
  CONNECTORS = ("linear", "conv_reg")

  @classmethod
  def extra_config(cls):
    return dict(connector="linear")

  def __init__(self, config):
    super().__init__(config)
    validation.one_of("config.fitnet.connector", config.connector, self.CONNECTORS)

  def _conv_reg(self, pair) -> bool:
    return self.config.connector == "conv_reg" and pair[2].ndim == 4

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    if self.config.connector == "conv_reg" and len(student_shape) == 4:
      (s_h, s_w), (t_h, t_w) = student_shape[1:3], teacher_shape[1:3]
      if len(teacher_shape) == 4 and ((2 * s_h, 2 * s_w) == (t_h, t_w) or
                                      (s_h >= t_h and s_w >= t_w)):
        return
    elif tuple(student_shape[:-1]) == tuple(teacher_shape[:-1]):
      return
    fix = ("connector='conv_reg' bridges student maps of half, twice or more than the "
           "teacher's size" if self.config.connector == "linear" else
           "pick a student map at least as large as the teacher's, or half its size")
    raise ValueError(
        f"config.fitnet.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
        f"config.fitnet.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: "
        f"config.fitnet.connector={self.config.connector!r} maps "
        f"{'channels (the last axis) only' if self.config.connector == 'linear' else 'sizes'}; "
        f"{fix}.")

  def _connector(self, pair, ops: Optional[base.BatchOps] = None):
    if self._conv_reg(pair):
      norm = ops.batch_norm if ops is not None and ops.batch_norm else nn.BatchNorm
      return ConvRegressor(pair[3].shape[-1], tuple(pair[3].shape[1:3]), norm)
    return nn.Dense(pair[3].shape[-1])

  def init(self, rng, sample):
    super().init(rng, sample)
    params, batch_stats = {}, {}
    for i, pair in enumerate(self._pairs(sample)):
      kwargs = {"train": False} if self._conv_reg(pair) else {}
      variables = self._connector(pair).init(jax.random.fold_in(rng, i), pair[2], **kwargs)
      params[f"connector{i}"] = variables["params"]
      if "batch_stats" in variables:
        batch_stats[f"connector{i}"] = variables["batch_stats"]
    return params, ({"batch_stats": batch_stats} if batch_stats else {})

  def loss(self, params, state, batch, ops):
    pairs = self._pairs(batch)
    new_stats = {}

    def connect(i, student):
      if not self._conv_reg(pairs[i]):
        return self._connector(pairs[i]).apply({"params": params[f"connector{i}"]}, student)
      connected, updates = self._connector(pairs[i], ops).apply(
          {"params": params[f"connector{i}"],
           "batch_stats": state["batch_stats"][f"connector{i}"]},
          student, train=True, mutable=["batch_stats"])
      new_stats[f"connector{i}"] = updates["batch_stats"]
      return connected

    term = _per_example_term(losses.fitnet, pairs, batch, ops, connect)
    loss, metrics = base.ce_term_and_kd(batch, ops, self.config,
                                        {self.name: (self.config.feature_weight, term)})
    return loss, metrics, (dict(state, batch_stats=new_stats) if new_stats else state)



class AT(FeatureMethod):
  """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): `losses.attention_transfer`
  summed over the stage pairs. RepDistiller: `-b 1000`, p 2, every stage (`stage1..3`); of two
  maps of different sizes the larger is average-pooled to the smaller (RepDistiller's
  `at_loss`)."""
  name = "at"
  family = "feature"
  paper = "Zagoruyko & Komodakis 2017"
  field_help = {
      "p": "the power of the attention map sum_c |f|^p (no abs, as the official code)",
  }
  default_student_tap = "stage1,stage2,stage3"
  default_teacher_tap = "stage1,stage2,stage3"
  default_feature_weight = 1000.0

  @classmethod
  def extra_config(cls):
    return dict(p=2.0)

  positive_fields = ("temperature", "p")

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    same_size = tuple(student_shape[1:-1]) == tuple(teacher_shape[1:-1])
    poolable = len(student_shape) == 4 and len(teacher_shape) == 4
    if len(student_shape) < 3 or not (same_size or poolable):
      raise ValueError(
          f"config.at.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
          f"config.at.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: attention "
          "transfer needs feature maps ([B, H, W, C], pooled to the smaller size, or [B, L, C] "
          "of equal length).")

  def term(self, params, pairs, batch, ops):
    def at(s, t, where):
      s, t = pool_to_common_size(s, t)
      return losses.attention_transfer(s, t, p=self.config.p, where=where)
    return _per_example_term(at, pairs, batch, ops)


class SP(FeatureMethod):
  """Similarity-preserving KD (Tung & Mori, ICCV 2019): `losses.similarity_preserving` on
  the global batch. RepDistiller: `-b 3000`, the last feature map (`stage3` of the CIFAR
  ResNets; the embedding here by default)."""
  name = "sp"
  family = "feature"
  paper = "Tung & Mori 2019"
  default_feature_weight = 3000.0

  def term(self, params, pairs, batch, ops):
    return _relational_term(losses.similarity_preserving, pairs, batch, ops)


class RKD(FeatureMethod):
  """Relational KD (Park et al., CVPR 2019): `distance_weight * losses.rkd_distance +
  angle_weight * losses.rkd_angle` on the global batch of embeddings. RepDistiller: `-b 1`
  with the paper's weights 25 and 50 (RKD-DA); a zero weight gives RKD-D or RKD-A."""
  name = "rkd"
  family = "feature"
  paper = "Park et al. 2019"
  field_help = {
      "distance_weight": "weight of the distance term (0: RKD-A)",
      "angle_weight": "weight of the angle term, O(B^3) work (0: RKD-D)",
  }

  @classmethod
  def extra_config(cls):
    return dict(distance_weight=25.0, angle_weight=50.0)

  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight", "distance_weight",
                         "angle_weight")

  def term(self, params, pairs, batch, ops):
    c = self.config

    def rkd(s, t, where):
      total = 0.0
      # A zero weight skips its term: the angle term is O(B^3) (RKD-D runs without it).
      if c.distance_weight:
        total = total + c.distance_weight * losses.rkd_distance(s, t, where=where)
      if c.angle_weight:
        total = total + c.angle_weight * losses.rkd_angle(s, t, where=where)
      return total

    return _relational_term(rkd, pairs, batch, ops)


class PKT(FeatureMethod):
  """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): `losses.pkt` on the
  global batch of embeddings. RepDistiller: `-b 30000`."""
  name = "pkt"
  family = "feature"
  paper = "Passalis & Tefas 2018"
  default_feature_weight = 30000.0

  def term(self, params, pairs, batch, ops):
    return _relational_term(losses.pkt, pairs, batch, ops)


FEATURE_METHODS = (FitNet, AT, SP, RKD, PKT)

METHODS = FEATURE_METHODS
