"""Pure-JAX distillation losses: `from kdjax import losses`.

Every function is pure and unreduced (per-example / per-token values of shape
`logits.shape[:-1]`; `[B]` for the feature losses `fitnet`, `attention_transfer`, `nst`,
`vid`, `ofd`, `hcl`, `nd`, `cat_kd` and the attention-relation losses `minilm_*`; a scalar for the batch-relational `dist`,
`similarity_preserving`, `rkd_distance`, `rkd_angle`, `pkt` and `correlation_congruence`),
takes `(student, teacher, ...)` in that order, keyword-only hyper-parameters and an
optional `where` mask. Only `jax` is imported: no Flax, no global state.
"""

from kdjax.losses.attention import minilm_relation
from kdjax.losses.attention import minilm_v1
from kdjax.losses.attention import minilm_v2
from kdjax.losses.chunked import chunked
from kdjax.losses.chunked import chunked_forward_kl
from kdjax.losses.chunked import chunked_kd
from kdjax.losses.class_attention import cat_kd
from kdjax.losses.contrastive import crd_nce
from kdjax.losses.dino import dino_center_and_sharpen
from kdjax.losses.dino import dino_cross_entropy
from kdjax.losses.dino import dino_update_center
from kdjax.losses.feature import attention_transfer
from kdjax.losses.feature import fitnet
from kdjax.losses.fused import fused_forward_kl
from kdjax.losses.fused import fused_generalized_jsd
from kdjax.losses.fused import fused_kd
from kdjax.losses.fused import fused_reverse_kl
from kdjax.losses.fused import fused_skew_forward_kl
from kdjax.losses.fused import fused_skew_reverse_kl
from kdjax.losses.fused import fused_total_variation
from kdjax.losses.kernel import correlation_congruence
from kdjax.losses.kernel import nst
from kdjax.losses.logit import dkd
from kdjax.losses.logit import forward_kl
from kdjax.losses.logit import generalized_jsd
from kdjax.losses.logit import kd
from kdjax.losses.logit import multi_teacher_kd
from kdjax.losses.logit import nkd
from kdjax.losses.logit import reverse_kl
from kdjax.losses.logit import skew_forward_kl
from kdjax.losses.logit import skew_reverse_kl
from kdjax.losses.logit import sparse_kd
from kdjax.losses.logit import standardize_logits
from kdjax.losses.logit import taid
from kdjax.losses.logit import total_variation
from kdjax.losses.norm_direction import nd
from kdjax.losses.overhaul import ofd
from kdjax.losses.overhaul import ofd_margin
from kdjax.losses.relational import dist
from kdjax.losses.relational import pkt
from kdjax.losses.relational import rkd_angle
from kdjax.losses.relational import rkd_distance
from kdjax.losses.relational import similarity_preserving
from kdjax.losses.review import hcl
from kdjax.losses.self_distillation import ema_momentum
from kdjax.losses.self_distillation import ema_update
from kdjax.losses.self_distillation import ps_kd_alpha
from kdjax.losses.self_distillation import ps_kd_targets
from kdjax.losses.self_distillation import soft_cross_entropy
from kdjax.losses.self_distillation import tf_kd_virtual
from kdjax.losses.self_distillation import virtual_teacher_probs
from kdjax.losses.universal_logit import align_completions
from kdjax.losses.universal_logit import sorted_probability_distance
from kdjax.losses.universal_logit import uld
from kdjax.losses.variational import vid

__all__ = (
    "align_completions",
    "attention_transfer",
    "cat_kd",
    "chunked",
    "chunked_forward_kl",
    "chunked_kd",
    "correlation_congruence",
    "crd_nce",
    "dino_center_and_sharpen",
    "dino_cross_entropy",
    "dino_update_center",
    "dist",
    "dkd",
    "ema_momentum",
    "ema_update",
    "fitnet",
    "forward_kl",
    "fused_forward_kl",
    "fused_generalized_jsd",
    "fused_kd",
    "fused_reverse_kl",
    "fused_skew_forward_kl",
    "fused_skew_reverse_kl",
    "fused_total_variation",
    "generalized_jsd",
    "hcl",
    "kd",
    "minilm_relation",
    "minilm_v1",
    "minilm_v2",
    "multi_teacher_kd",
    "nd",
    "nkd",
    "nst",
    "ofd",
    "ofd_margin",
    "pkt",
    "ps_kd_alpha",
    "ps_kd_targets",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "sorted_probability_distance",
    "sparse_kd",
    "standardize_logits",
    "taid",
    "tf_kd_virtual",
    "total_variation",
    "uld",
    "vid",
    "virtual_teacher_probs",
)
