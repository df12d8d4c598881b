"""Pure-JAX distillation losses: `from kdjax import losses`.

Every function is pure and unreduced (per-example / per-token values of shape
`logits.shape[:-1]`, `[B]` for the feature losses `fitnet` and `attention_transfer`, or a
scalar for the batch-relational `dist`, `similarity_preserving`, `rkd_distance`,
`rkd_angle` and `pkt`), takes
`(student, teacher, ...)` in that order, keyword-only hyper-parameters and an
optional `where` mask. Only `jax` is imported: no Flax, no global state.
"""

from kdjax.losses.chunked import chunked
from kdjax.losses.chunked import chunked_forward_kl
from kdjax.losses.chunked import chunked_kd
from kdjax.losses.contrastive import crd_nce
from kdjax.losses.feature import attention_transfer
from kdjax.losses.feature import fitnet
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
from kdjax.losses.relational import dist
from kdjax.losses.relational import pkt
from kdjax.losses.relational import rkd_angle
from kdjax.losses.relational import rkd_distance
from kdjax.losses.relational import similarity_preserving

__all__ = (
    "attention_transfer",
    "chunked",
    "chunked_forward_kl",
    "chunked_kd",
    "crd_nce",
    "dist",
    "dkd",
    "fitnet",
    "forward_kl",
    "generalized_jsd",
    "kd",
    "multi_teacher_kd",
    "nkd",
    "pkt",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_kd",
    "standardize_logits",
    "taid",
    "total_variation",
)
