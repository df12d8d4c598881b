"""MiniPLM (Gu et al., ICLR 2025): knowledge distillation for pre-training by data refinement.

The teacher is used offline, once, to choose the training data ("difference sampling"): each
training example is scored by how much more likely the teacher finds it than a small
reference LM,

    score(x) = (1/|x|) sum_t [log p_teacher(x_t | x_<t) - log p_reference(x_t | x_<t)],

the `keep_fraction` highest-scoring examples are kept (0.5 in the paper: 100B of the Pile's
tokens down to 50B), and the student is pre-trained on them with the plain next-token loss (no
teacher logits at training time). As the official code (thu-coai/MiniPLM,
`compute_difference_scores.py`: small-model minus large-model mean token loss; keep the top
`ratio`). The reference is `config.miniplm.reference`: a suite row that runs before this one
(the `scratch` student here, as a reference LM trained on the same corpus) or a checkpoint.
Scoring runs before the first step (`select_examples`); the choice depends only on the two
models, so a resumed run makes it again identically.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax.methods import base


def mean_token_log_likelihood(logits: jax.Array, targets: jax.Array,
                              mask: jax.Array) -> jax.Array:
  """[n, T, V] logits, [n, T] targets and mask -> [n]: each sequence's mean log p(target)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_probs, jnp.where(mask, targets, 0)[..., None], -1)[..., 0]
  return jnp.sum(picked * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1)


class MiniPLM(base.Method):
  """Plain next-token cross-entropy on the examples difference sampling keeps."""
  name = "miniplm"
  family = "language model"
  paper = "Gu et al. 2025"
  field_help = {
      "ce_weight": "weight of the next-token cross-entropy",
      "keep_fraction": "fraction of the training windows kept by difference sampling",
      "reference": "the reference LM: a suite row that runs earlier, or a checkpoint path",
      "score_batch_size": "windows scored together when choosing the data",
  }
  reference_field = "reference"
  positive_fields = ("ce_weight",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(keep_fraction=0.5, reference="scratch",
                                          ce_weight=1.0, score_batch_size=64))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "keep_fraction", 0.0, 1.0, low_inclusive=False)
    base.check_positive_int(config, self.name, "score_batch_size")

  def difference_scores(self, pipeline, indices, *, teacher_apply, teacher_variables,
                        reference_apply) -> np.ndarray:
    """[len(indices)] difference scores of the training windows `indices`."""
    @jax.jit
    def scores(teacher_variables, reference_variables, batch):
      teacher, _ = teacher_apply(teacher_variables, batch["tokens"], train=False)
      reference, _ = reference_apply(reference_variables, batch["tokens"], train=False)
      return (mean_token_log_likelihood(teacher.logits, batch["targets"], batch["mask"]) -
              mean_token_log_likelihood(reference.logits, batch["targets"], batch["mask"]))

    size = self.config.score_batch_size
    out = []
    for begin in range(0, len(indices), size):
      chunk = indices[begin:begin + size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])  # One shape.
      batch = pipeline.training_windows(padded)
      out.append(np.asarray(scores(teacher_variables, self.facts.reference_variables,
                                   batch))[:len(chunk)])
    return np.concatenate(out)

  def select_examples(self, pipeline, *, teacher_apply, teacher_variables,
                      reference_apply) -> np.ndarray:
    """The training windows to keep: the top `keep_fraction` by difference score."""
    indices = np.arange(pipeline.num_train_examples)
    scores = self.difference_scores(pipeline, indices, teacher_apply=teacher_apply,
                                    teacher_variables=teacher_variables,
                                    reference_apply=reference_apply)
    keep = max(1, int(round(self.config.keep_fraction * len(indices))))
    # Highest score first; ties by index (a stable, seed-independent choice).
    order = np.lexsort((indices, -scores))
    return np.sort(indices[order[:keep]])

  def loss(self, params, state, batch, ops):
    ce = base.cross_entropy(batch, ops)
    loss = self.config.ce_weight * ce
    return loss, {"loss": loss, "ce": ce, "accuracy": base.accuracy(batch, ops)}, state


METHODS = (MiniPLM,)
