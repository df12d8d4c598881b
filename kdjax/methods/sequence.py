"""Divergence methods for LM-style (token-level) distillation, also usable on classifiers.

Each is `ce_weight * CE + kd_weight * divergence(s, t, temperature, ...)` averaged over the
selected tokens: logits `[b, T, V]` with labels and `where` `[b, T]` (or `[b, C]` with `[b]`).
Defaults: `ce_weight` 0 (pure distillation, as GKD and DistiLLM train), `kd_weight` 1,
`temperature` 1; `jsd` `beta` 0.5 (TRL's `GKDTrainer` default); skew `alpha` 0.1 (DistiLLM's
default skew, also SakanaAI/TAID's `--skew_beta`); `fused` 'auto' (from hidden states with the
vocabulary-chunked losses on large vocabularies, `kdjax.methods.lm_fused`).
"""

from typing import Callable, ClassVar, Dict, Tuple

import ml_collections

from kdjax import losses
from kdjax.methods import base, lm_fused


class _Divergence(base.Method):
  """Shared body: subclasses name the loss function and its extra hyper-parameters."""
  field_help = {
      "kd_weight": "weight of the divergence term",
      "temperature": "softmax temperature of both distributions (no T^2 factor)",
      "fused": lm_fused.FIELD_HELP,
  }
  divergence: ClassVar[Callable]
  # field -> (default, low, high, high_inclusive): the loss's own hyper-parameters.
  extra_fields: ClassVar[Dict[str, Tuple[float, float, float, bool]]] = {}

  @classmethod
  def default_config(cls):
    config = dict(ce_weight=0.0, kd_weight=1.0, temperature=1.0, fused="auto")
    config.update({field: spec[0] for field, spec in cls.extra_fields.items()})
    return ml_collections.ConfigDict(config)

  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)

  def __init__(self, config):
    super().__init__(config)
    for field, (_, low, high, high_inclusive) in self.extra_fields.items():
      base.check_interval(config, self.name, field, low, high, high_inclusive=high_inclusive)
    lm_fused.check_mode(config, self.name)

  def loss(self, params, state, batch, ops):
    c = self.config
    extra = {field: c[field] for field in self.extra_fields}
    fused = lm_fused.use_fused(c.fused, batch, self.name)
    ce, ce_metrics = lm_fused.ce_and_accuracy(batch, ops, fused=fused, ce_weight=c.ce_weight)
    divergence = ops.mean(lm_fused.divergence(
        type(self).divergence, batch, fused=fused, temperature=c.temperature, **extra),
        batch.where)
    loss = c.ce_weight * ce + c.kd_weight * divergence
    return loss, {"loss": loss, self.name: divergence, **ce_metrics}, state


class ForwardKL(_Divergence):
  """`KL(p_t || p_s)` per token (`losses.forward_kl`): mean-seeking, as in word-level KD."""
  name = "fkl"
  family = "language model"
  teacher_needs = base.TeacherNeeds(cache="topk")
  divergence = staticmethod(losses.forward_kl)


class ReverseKL(_Divergence):
  """`KL(p_s || p_t)` per token (`losses.reverse_kl`): mode-seeking (MiniLLM, GKD)."""
  name = "rkl"
  family = "language model"
  divergence = staticmethod(losses.reverse_kl)


class JSD(_Divergence):
  """Generalized JSD with mixture weight `beta` (`losses.generalized_jsd`, GKD / TRL);
  `beta` 0 is forward KL, 1 reverse KL."""
  name = "jsd"
  family = "language model"
  paper = "Agarwal et al. 2024"
  field_help = {
      "beta": "mixture weight: 0 is forward KL, 1 reverse KL (TRL's convention)",
  }
  divergence = staticmethod(losses.generalized_jsd)
  extra_fields = {"beta": (0.5, 0.0, 1.0, True)}


class SkewForwardKL(_Divergence):
  """`KL(p_t || alpha p_t + (1 - alpha) p_s)` (`losses.skew_forward_kl`, DistiLLM)."""
  name = "skew_fkl"
  family = "language model"
  paper = "Ko et al. 2024"
  field_help = {
      "alpha": "skew: the student side is alpha*p_t + (1-alpha)*p_s",
  }
  divergence = staticmethod(losses.skew_forward_kl)
  extra_fields = {"alpha": (0.1, 0.0, 1.0, False)}


class SkewReverseKL(_Divergence):
  """`KL(p_s || alpha p_s + (1 - alpha) p_t)` (`losses.skew_reverse_kl`, DistiLLM)."""
  name = "skew_rkl"
  family = "language model"
  paper = "Ko et al. 2024"
  field_help = {
      "alpha": "skew: the teacher side is alpha*p_s + (1-alpha)*p_t",
  }
  divergence = staticmethod(losses.skew_reverse_kl)
  extra_fields = {"alpha": (0.1, 0.0, 1.0, False)}


class TotalVariation(_Divergence):
  """`0.5 * sum |p_t - p_s|` per token (`losses.total_variation`)."""
  name = "tvd"
  family = "language model"
  divergence = staticmethod(losses.total_variation)


SEQUENCE_METHODS = (ForwardKL, ReverseKL, JSD, SkewForwardKL, SkewReverseKL, TotalVariation)

METHODS = SEQUENCE_METHODS
