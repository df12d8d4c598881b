"""MiniLM: self-attention and value-relation distillation (Wang et al. 2020, 2021).

`ce_weight * CE + kd_weight * KD(T) + feature_weight * term`, the term computed on one
transformer layer of each model from its attention taps `'query{i}'`, `'key{i}'`,
`'value{i}'` (`[B, heads, T, head_dim]`, as `kdjax.models.vit` and any model with the same
taps provide):

- `version='v1'` (MiniLM): `losses.minilm_v1`, the KL between the teacher's and the student's
  attention distributions plus that of their value relations; equal head counts needed.
- `version='v2'` (MiniLMv2): `losses.minilm_v2`, Q-Q, K-K and V-V relations over
  `num_relation_heads` relation heads, so head counts and widths may differ (teacher
  `vit_small`, 6 heads of 64, and student `vit_tiny`, 3 heads of 64).

Layers are numbered as the taps, 1..depth, or from the end, -1 the last. The papers distil the
student's last layer from the teacher's last (v1, and v2 with base-size teachers) or an
upper-middle layer (v2 with large teachers); the term is a per-example mean over heads and
query tokens, averaged over the batch with `batch.where`. MiniLM itself trains with this term
alone (task-agnostic distillation); here the CE on labels is on by default like the other
feature methods (set `ce_weight=0` for the paper's objective). `num_relation_heads=12` gives
`vit_tiny`'s width 192 relation heads of 16, the width of the paper's 48 heads on 768.
The method has no parameters and no state.
"""

import re
from typing import Dict, Tuple

import jax.numpy as jnp
import ml_collections

from kdjax.losses import attention as attention_losses
from kdjax.methods import base
from kdjax.methods.feature import feature_tap

VERSIONS = ("v1", "v2")
_KINDS = ("query", "key", "value")


class MiniLM(base.Method):
  """MiniLM v1 / v2 on one (student, teacher) layer pair; see the module docstring."""

  name = "minilm"
  family = "feature"
  paper = "Wang et al. 2020, 2021"
  field_help = {
      "version": "'v1' (attention and value relations) or 'v2' (Q-Q, K-K, V-V relations)",
      "num_relation_heads": "relation heads of v2",
      "student_layer": "the student's layer, 1..depth or negative from the end",
      "teacher_layer": "the teacher's layer, 1..depth or negative from the end",
  }
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0, feature_weight=1.0, version="v2",
        student_layer=-1, teacher_layer=-1, num_relation_heads=12))

  def __init__(self, config):
    super().__init__(config)
    if config.version not in VERSIONS:
      raise ValueError(f"config.minilm.version must be one of {', '.join(VERSIONS)}, got "
                       f"{config.version!r}.")
    for field in ("student_layer", "teacher_layer"):
      value = config[field]
      if not isinstance(value, int) or isinstance(value, bool) or value == 0:
        raise ValueError(f"config.minilm.{field} must be a non-zero integer (1..depth, or -1 "
                         f"for the last layer), got {value!r}.")
    base.check_positive_int(config, self.name, "num_relation_heads")

  def _layer_taps(self, output, role: str) -> Tuple[str, Dict[str, jnp.ndarray]]:
    """('query{i}', {kind: tap}) of the configured layer of `output` (role: 'student' or
    'teacher'); errors name the field and the taps that exist."""
    field = f"config.minilm.{role}_layer"
    layer = self.config[f"{role}_layer"]
    layers = sorted(int(m.group(1)) for m in map(re.compile(r"query(\d+)$").match,
                                                  output.features) if m)
    if not layers:
      raise ValueError(f"{field}={layer}: the {role} model has no attention taps ('query{{i}}', "
                       f"'key{{i}}', 'value{{i}}' [B, heads, T, head_dim]); its taps: "
                       f"{', '.join(sorted(output.features))}.")
    depth = layers[-1]
    index = layer if layer > 0 else depth + 1 + layer
    if not 1 <= index <= depth:
      raise ValueError(f"{field}={layer}: the {role} model has {depth} layers (taps query1.."
                       f"query{depth}); use 1..{depth}, or -1..-{depth} from the end.")
    taps = {kind: feature_tap(output, f"{kind}{index}", field, role) for kind in _KINDS}
    return f"query{index}", taps

  def _pairs(self, batch: base.Batch):
    student_name, student = self._layer_taps(batch.student, "student")
    teacher_name, teacher = self._layer_taps(batch.teacher, "teacher")
    self._check_shapes(student_name, teacher_name, student["query"].shape,
                       teacher["query"].shape)
    return student, teacher

  def _check_shapes(self, student_name, teacher_name, student_shape, teacher_shape):
    c = self.config
    described = (f"config.minilm.student_layer={c.student_layer} (tap {student_name!r}) has "
                 f"shape {tuple(student_shape)} and config.minilm.teacher_layer="
                 f"{c.teacher_layer} (tap {teacher_name!r}) has shape {tuple(teacher_shape)}")
    if len(student_shape) != 4 or len(teacher_shape) != 4:
      raise ValueError(f"{described}: MiniLM needs [B, heads, T, head_dim] taps.")
    if student_shape[2] != teacher_shape[2]:
      raise ValueError(f"{described}: relations are T x T, so both models need the same number "
                       "of tokens T (the third axis); use the same patch size and image size.")
    if c.version == "v1" and student_shape[1] != teacher_shape[1]:
      raise ValueError(f"{described}: version 'v1' compares attention head by head and needs "
                       "equal head counts; use version 'v2' with num_relation_heads.")
    if c.version == "v2":
      for shape in (student_shape, teacher_shape):
        if (shape[1] * shape[3]) % c.num_relation_heads:
          raise ValueError(
              f"{described}: config.minilm.num_relation_heads={c.num_relation_heads} must "
              f"divide both widths heads * head_dim ({student_shape[1] * student_shape[3]} and "
              f"{teacher_shape[1] * teacher_shape[3]}).")

  def init(self, rng, sample):
    self._pairs(sample)  # Taps and shapes are checked before training.
    return {}, {}

  def term(self, batch: base.Batch) -> jnp.ndarray:
    """The per-example MiniLM term `[b]` (before `feature_weight`), 0 where not `where`."""
    student, teacher = self._pairs(batch)
    args = (student["query"], teacher["query"], student["key"], teacher["key"],
            student["value"], teacher["value"])
    if self.config.version == "v1":
      return attention_losses.minilm_v1(*args, where=batch.where)
    return attention_losses.minilm_v2(*args, num_relation_heads=self.config.num_relation_heads,
                                      where=batch.where)

  def loss(self, params, state, batch, ops):
    c = self.config
    term = ops.mean(self.term(batch), batch.where)
    loss, metrics = base.ce_term_and_kd(batch, ops, c, {self.name: (c.feature_weight, term)})
    return loss, metrics, state


METHODS = (MiniLM,)
