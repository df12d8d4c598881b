"""OFD: overhaul of feature distillation (Heo et al., ICCV 2019).

The student's pre-ReLU stage features go through a connector (a 1x1 conv to the teacher's
channels, then BatchNorm: `build_feature_connector` of the official code) and are compared with
the teacher's pre-ReLU features by `losses.ofd`, the teacher clipped at the margins
`losses.ofd_margin` of the BatchNorm before each of its ReLUs. The stages are weighted
`1 / 2**(n - 1 - k)` (the deepest 1, the one before 1/2, ...), as the official code.

Margins. The loss reads the teacher's BatchNorm scale and bias from `Batch.teacher_variables`
(under stop_gradient) at every step, so a teacher swapped or loaded later is always the one
used. Which BatchNorm belongs to which tap is either given in `config.ofd.teacher_bn` (flax
paths into the teacher's `params`, one per teacher tap, e.g. `'stage1_block4/bn2'`) or looked
up from `config.ofd.teacher_model` in the model families' `BN_BEFORE_RELU` tables
(`kdjax.models.cifar_resnet.BN_BEFORE_RELU['resnet32x4']['stage1_preact']`, ...).

The connector's BatchNorm. It runs in training mode (batch statistics) at every step, as the
official connector does: the connector only exists during distillation. Its statistics are
taken over the selected rows of the *global* batch: the method gathers the taps
(`ops.gather`) and normalises them with a masked BatchNorm, so padding rows of a last batch do
not shift them and one device and N devices give the same numbers (like the relational
losses, everything after the gather is computed identically on every replica). Its running
averages (momentum 0.1 in PyTorch terms) are kept in the method state, `state['batch_stats']`,
checkpointed with the run like the PyTorch module's buffers; no loss reads them (Flax updates
the running variance with the biased batch variance where PyTorch uses the unbiased one).

Differences from the official CIFAR-100 script: it runs the teacher in training mode (batch
statistics; `d_net.t_net.train()`), kdjax's step runs every teacher in eval mode.
"""

from typing import Any, Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax.losses.overhaul import ofd, ofd_margin
from kdjax.methods import base, feature

_PREACT_TAPS = "stage1_preact,stage2_preact,stage3_preact"


class ConvBNConnector(nn.Module):
  """OFD's connector: `k x k` conv (no bias, stride 1, 'same' padding) to `channels`, then
  BatchNorm in training mode. `[B, H, W, C_s]` -> `[B, H, W, channels]`.

  Initialisation as the official `build_feature_connector`: conv weights
  `N(0, 2 / (k * k * channels))` (He, fan-out, untruncated), BatchNorm scale 1 and bias 0.
  `mask` ([B] bool) selects the rows whose statistics the BatchNorm uses.
  """
  channels: int
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x, mask):
    k = self.kernel_size
    x = nn.Conv(self.channels, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                name="conv")(x)
    # torch BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5.
    return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                        use_fast_variance=False, name="bn")(
                            x, mask=mask.reshape((-1,) + (1,) * (x.ndim - 1)))


def statistics_mask(where: jax.Array) -> jax.Array:
  """The rows a method-owned BatchNorm takes its statistics from: the selected ones, or all
  (zeroed) rows when none is selected, so that the statistics stay finite (0/0 otherwise)."""
  where = where.astype(bool)
  return where | ~jnp.any(where)


def bn_before_relu_table() -> Dict[str, Dict[str, str]]:
  """Every model family's `BN_BEFORE_RELU` table, merged: {model: {tap: flax path}}."""
  from kdjax.models import registry  # pylint: disable=import-outside-toplevel
  table = {}
  for family in registry._FAMILIES:  # pylint: disable=protected-access
    table.update(getattr(family, "BN_BEFORE_RELU", {}))
  return table


def _lookup(tree: Any, path: str, field: str) -> Any:
  node = tree
  parts = [p for p in path.split("/") if p]
  for depth, part in enumerate(parts):
    if not isinstance(node, dict) and not hasattr(node, "keys"):
      break
    if part not in node:
      parent = "/".join(parts[:depth]) or "the top level"
      raise ValueError(
          f"{field}: the teacher's params have no {path!r} ({part!r} is missing under "
          f"{parent}; there: {', '.join(sorted(node.keys()))}).")
    node = node[part]
  if not (hasattr(node, "keys") and "scale" in node and "bias" in node):
    raise ValueError(f"{field}: {path!r} in the teacher's params is not a BatchNorm with "
                     "'scale' and 'bias'.")
  return node


class OFD(base.Method):
  """`ce_weight * CE + kd_weight * KD + feature_weight * sum_k ofd_k / 2**(n-1-k)`.

  `ofd_k` is the batch mean of `losses.ofd` (a per-example *sum* over positions and channels)
  for tap pair `k` (`student_tap`, `teacher_tap`: comma-separated, paired in order). Defaults:
  the official CIFAR-100 recipe, `CE + sum_k ofd_k / 2**(n-1-k) / 1000`
  (clovaai/overhaul-distillation `CIFAR-100/train_with_distillation.py`@93bbcd2b; mdistiller
  `CFG.OFD.LOSS.FEAT_WEIGHT` 0.001, `CONNECTOR.KERNEL_SIZE` 1), on the three pre-ReLU stage
  taps of both models.
  """
  name = "ofd"
  family = "feature"
  paper = "Heo et al. 2019"
  field_help = {
      "connector_kernel_size": "kernel size of the connector's convolution",
      "teacher_bn": "the teacher's BatchNorm paths, one per teacher tap ('' : from teacher_model)",
      "teacher_model": "model whose BN_BEFORE_RELU table gives the margins ('': "
                       "config.teacher.model)",
  }
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0, feature_weight=1e-3,
        student_tap=_PREACT_TAPS, teacher_tap=_PREACT_TAPS, connector_kernel_size=1,
        teacher_bn="", teacher_model=""))

  def __init__(self, config):
    super().__init__(config)
    self.student_taps = feature._names(config.student_tap)  # pylint: disable=protected-access
    self.teacher_taps = feature._names(config.teacher_tap)  # pylint: disable=protected-access
    if not self.student_taps or len(self.student_taps) != len(self.teacher_taps):
      raise ValueError(
          f"config.ofd.student_tap={config.student_tap!r} and "
          f"config.ofd.teacher_tap={config.teacher_tap!r} must name the same number (at least "
          "one) of comma-separated taps, paired in order.")
    kernel = config.connector_kernel_size
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel <= 0 or not kernel % 2:
      raise ValueError(f"config.ofd.connector_kernel_size must be a positive odd integer (the "
                       f"conv keeps the spatial size), got {kernel!r}.")
    self.teacher_bn = feature._names(config.teacher_bn)  # pylint: disable=protected-access
    if self.teacher_bn and len(self.teacher_bn) != len(self.teacher_taps):
      raise ValueError(
          f"config.ofd.teacher_bn={config.teacher_bn!r} must name one BatchNorm per teacher tap "
          f"(config.ofd.teacher_tap={config.teacher_tap!r}: {len(self.teacher_taps)}), "
          "comma-separated, in the same order.")
    if not self.teacher_bn and config.teacher_model:
      self.teacher_bn = self._bn_paths(config.teacher_model, "config.ofd.teacher_model")

  def _bn_paths(self, model: str, field: str) -> List[str]:
    """The teacher BatchNorm before each teacher tap's ReLU, from the BN_BEFORE_RELU tables."""
    table = bn_before_relu_table()
    if model not in table:
      raise ValueError(
          f"{field}={model!r} has no BN_BEFORE_RELU table; models with one: "
          f"{', '.join(sorted(table)) or 'none'}. Or name the BatchNorms in "
          "config.ofd.teacher_bn.")
    paths = table[model]
    missing = [tap for tap in self.teacher_taps if tap not in paths]
    if missing:
      raise ValueError(
          f"config.ofd.teacher_tap={self.config.teacher_tap!r}: BN_BEFORE_RELU of {model!r} "
          f"has no BatchNorm for {', '.join(missing)}; its taps: {', '.join(sorted(paths))}.")
    return [paths[tap] for tap in self.teacher_taps]

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    if len(student_shape) != 4 or tuple(student_shape[:-1]) != tuple(teacher_shape[:-1]):
      raise ValueError(
          f"config.ofd.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
          f"config.ofd.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: the "
          f"connector (config.ofd.connector_kernel_size={self.config.connector_kernel_size}, "
          "stride 1) maps channels (the last axis) only; pick [B, H, W, C] taps of equal "
          "spatial size.")

  def _pairs(self, batch):
    return [(s, t, feature.feature_tap(batch.student, s, "config.ofd.student_tap", "student"),
             feature.feature_tap(batch.teacher, t, "config.ofd.teacher_tap", "teacher"))
            for s, t in zip(self.student_taps, self.teacher_taps)]

  def _connector(self, channels: int) -> ConvBNConnector:
    return ConvBNConnector(channels, self.config.connector_kernel_size)

  def init(self, rng, sample):
    pairs = self._pairs(sample)
    for student_tap, teacher_tap, student, teacher in pairs:
      self.check_pair(student_tap, teacher_tap, student.shape, teacher.shape)
    params, batch_stats = {}, {}
    for i, (_, _, student, teacher) in enumerate(pairs):
      variables = self._connector(teacher.shape[-1]).init(
          jax.random.fold_in(rng, i), jnp.zeros(student.shape, jnp.float32),
          jnp.ones(student.shape[:1], bool))
      params[f"connector{i}"] = variables["params"]
      batch_stats[f"connector{i}"] = variables["batch_stats"]
    return params, {"batch_stats": batch_stats}

  def margins(self, teacher_variables: Any, teacher_shapes: Sequence[tuple]) -> List[jax.Array]:
    """`[C_k]` margins of the teacher's BatchNorms before its ReLUs, one per teacher tap."""
    if not self.teacher_bn and self.facts.teacher_model:  # The run's teacher model.
      self.teacher_bn = self._bn_paths(self.facts.teacher_model, "config.teacher.model")
    if not self.teacher_bn:
      raise ValueError(
          "ofd needs to know which teacher BatchNorm precedes each teacher tap's ReLU: set "
          "config.ofd.teacher_model to the teacher's model name (looked up in the models' "
          "BN_BEFORE_RELU tables) or list the flax paths in config.ofd.teacher_bn (e.g. "
          "'stage1_block4/bn2,stage2_block4/bn2,stage3_block4/bn2').")
    if teacher_variables is None:
      raise ValueError("ofd reads its margins from the teacher's BatchNorm parameters: the "
                       "batch carries no teacher_variables.")
    params = teacher_variables.get("params", teacher_variables)
    norms = []
    for path, tap, shape in zip(self.teacher_bn, self.teacher_taps, teacher_shapes):
      bn = _lookup(params, path.removeprefix("params/"), "config.ofd.teacher_bn")
      if tuple(bn["scale"].shape) != (shape[-1],):
        raise ValueError(
            f"config.ofd.teacher_bn: {path!r} has scale shape {tuple(bn['scale'].shape)} but "
            f"config.ofd.teacher_tap={tap!r} has shape {tuple(shape)}; name the BatchNorm "
            "that precedes that tap's ReLU (one value per tap channel).")
      norms.append(bn)
    return [ofd_margin(bn["scale"], bn["bias"]) for bn in norms]

  def loss(self, params, state, batch, ops):
    c = self.config
    pairs = self._pairs(batch)
    margins = self.margins(batch.teacher_variables, [t.shape for _, _, _, t in pairs])
    # The connector's BatchNorm needs the global batch; so does everything after it.
    where = ops.gather(batch.where).astype(bool)
    statistics_rows = statistics_mask(where)
    total, new_stats = 0.0, {}
    n = len(pairs)
    for i, ((_, _, student, teacher), margin) in enumerate(zip(pairs, margins)):
      student = base.mask_rows(ops.gather(student).astype(jnp.float32), where)
      teacher = ops.gather(teacher)
      connected, updates = self._connector(teacher.shape[-1]).apply(
          {"params": params[f"connector{i}"],
           "batch_stats": state["batch_stats"][f"connector{i}"]},
          student, statistics_rows, mutable=["batch_stats"])
      new_stats[f"connector{i}"] = updates["batch_stats"]
      per_example = ofd(connected, teacher, margin, where=where)
      mean = jnp.sum(per_example) / jnp.maximum(jnp.sum(where), 1)
      total = total + mean / 2 ** (n - 1 - i)
    loss, metrics = base.ce_term_and_kd(batch, ops, c, {"ofd": (c.feature_weight, total)})
    return loss, metrics, dict(state, batch_stats=new_stats)


METHODS = (OFD,)
