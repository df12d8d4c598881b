"""PS-KD: progressive self-knowledge distillation (Kim et al., ICCV 2021).

The teacher is the model itself one epoch ago: each training example's target is
`(1 - alpha_t) * onehot(y) + alpha_t * p_prev(x)`, where `p_prev(x)` is the softmax the model
gave that example the last time it was trained on (the previous epoch), and `alpha_t` grows
linearly, epoch by epoch, to `alpha_T` (`losses.ps_kd_alpha`). The loss is the cross-entropy
against these soft targets (`losses.soft_cross_entropy`), as the official code's
`Custom_CrossEntropy_PSKD`. No second model and no teacher checkpoint.

State: `history` [num_train_examples, C] float32, the last softmax prediction of each training
example (by `Batch.data['index']`), and `seen` [num_train_examples] bool. The official code
overwrites the stored predictions with the one-hot labels in epoch 0, so its first-epoch
targets are one-hot; here an example without a stored prediction (`seen` False) gets the
one-hot target, which is the same in epoch 0 and needs no labels at init. The predictions are
those of the training forward pass (train mode, augmented inputs), before the optimizer step,
as the official code stores `softmax(outputs)` of the step's own forward.

Epochs in steps: kdjax's training stream is a fresh shuffle of the split each epoch, so an
example comes back about every `examples / global_batch_size` steps (set `steps_per_epoch` to
that, rounded) and its stored prediction is from the previous epoch. The weight is
`alpha_t = alpha_T * min(1, (step // steps_per_epoch + 1) * steps_per_epoch / num_steps)`,
the official `alpha_T * (epoch + 1) / end_epoch` with `end_epoch = num_steps /
steps_per_epoch`.

The history is written from the gathered global batch (`ops.gather`), so every replica holds
the same history whatever the parallelism. Padding rows (`where` False) write nothing, and
when an example occurs twice in one global batch (a batch straddling two epochs) its last
occurrence is stored. It is replicated and checkpointed with the train state: 4000 x 10
floats on MNIST-1D, 50000 x 100 (20 MB) on CIFAR-100, but 1.28M x 1000 (5 GB per device) on
ImageNet, where the official code keeps it on the host.
"""

import jax
import jax.numpy as jnp
import ml_collections

from kdjax.losses import self_distillation as sd_losses
from kdjax.methods import base


class PSKD(base.Method):
  """`soft_cross_entropy(student, (1 - alpha_t) * onehot + alpha_t * p_prev)`.

  Defaults: lgcnsai/PS-KD-Pytorch `main.py`@a8feeb5 (`--alpha_T 0.8`, `--end_epoch 300`;
  loss `loss/pskd_loss.py`@6ca4e75) on CIFAR-100 at the paper's batch 128 (50000 examples:
  391 steps an epoch, so `num_steps` 117300).
  Set `num_steps` to the run's `config.num_steps` and `steps_per_epoch` to the split's size
  over the global batch size (the quickstart: 4000 / 128 -> 32).
  """
  name = "ps_kd"
  family = "self"
  paper = "Kim et al. 2021"
  field_help = {
      "alpha_T": "weight of the previous epoch's predictions in the target at the last step",
      "steps_per_epoch": "steps per epoch (training examples / global batch size, rounded up)",
  }
  teacher_needs = base.TeacherNeeds(kind="none")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(alpha_T=0.8, num_steps=117300, steps_per_epoch=391))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "alpha_T", 0.0, 1.0)
    base.check_positive_int(config, self.name, "num_steps")
    base.check_positive_int(config, self.name, "steps_per_epoch")

  def init(self, rng, sample):
    del rng
    size = self.facts.num_train_examples
    if size is None:
      raise ValueError("ps_kd keeps one prediction per training example; build it with "
                       "build_method(config, num_train_examples=N).")
    num_classes = sample.student.logits.shape[-1]
    if sample.student.logits.ndim != 2:
      raise ValueError(f"ps_kd needs [b, C] logits (classification), got shape "
                       f"{tuple(sample.student.logits.shape)}.")
    return {}, {"history": jnp.zeros((size, num_classes), jnp.float32),
                "seen": jnp.zeros((size,), bool)}

  def alpha(self, step):
    c = self.config
    return sd_losses.ps_kd_alpha(step, alpha_T=c.alpha_T, num_steps=c.num_steps,
                                 steps_per_epoch=c.steps_per_epoch)

  def loss(self, params, state, batch, ops):
    del params
    if "index" not in batch.data:
      raise ValueError("ps_kd needs each example's position in the training split, "
                       "Batch.data['index'] (the training pipeline adds it).")
    index = batch.data["index"]
    alpha = self.alpha(batch.step)
    targets = sd_losses.ps_kd_targets(
        base.mask_rows(batch.labels, batch.where), state["history"][index], alpha=alpha,
        seen=state["seen"][index])
    ps_kd = ops.mean(sd_losses.soft_cross_entropy(batch.student.logits, targets,
                                                  where=batch.where), batch.where)
    new_state = update_history(state, ops.gather(index), ops.gather(batch.where),
                               ops.gather(jax.lax.stop_gradient(batch.student.logits)))
    metrics = {"loss": ps_kd, "ps_kd": ps_kd, "alpha": alpha,
               "ce": base.cross_entropy(batch, ops), "accuracy": base.accuracy(batch, ops)}
    return ps_kd, metrics, new_state


def update_history(state, index, where, logits):
  """The state with the rows `index` [B] of `history` set to `softmax(logits)` [B, C] and
  marked `seen`, for the rows where `where` [B] is True; of repeated indices the last wins."""
  size = state["history"].shape[0]
  later = jnp.arange(index.shape[0])[None, :] > jnp.arange(index.shape[0])[:, None]
  repeated_later = jnp.any((index[:, None] == index[None, :]) & later & where[None, :], axis=1)
  # Rows that write nothing point past the end and are dropped by the scatter, so no write
  # order between duplicates is left to the backend.
  rows = jnp.where(where & ~repeated_later, index, size)
  probs = jax.nn.softmax(base.mask_rows(logits.astype(jnp.float32), where), axis=-1)
  return dict(state, history=state["history"].at[rows].set(probs, mode="drop"),
              seen=state["seen"].at[rows].set(True, mode="drop"))


METHODS = (PSKD,)
