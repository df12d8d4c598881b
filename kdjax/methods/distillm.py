"""DistiLLM (Ko et al., ICML 2024): skew KL with adaptive off-policy student generations.

Loss: the skew forward KL `KL(p_t || alpha p_t + (1 - alpha) p_s)` (`divergence='skew_fkl'`,
the official GPT-2 0.1B recipe) or the skew reverse KL `KL(p_s || alpha p_s + (1 - alpha) p_t)`
(`'skew_rkl'`, the larger recipes), alpha 0.1 (`--skew-alpha`), over the batch's tokens.

Data, as the official `finetune.py` (jongwooko/distillm) decides it each step with one draw
`r ~ U(0, 1)` (the same on every device):

    samp_thr = thr * (1 - step / num_train_steps)        # replay_ratio 'decreasing'
    if r < samp_thr or (r < thr and buffer not full):  fresh student samples (also pushed
                                                       into the replay buffer)
    elif r < thr:                                      a batch drawn from the replay buffer
    else:                                              the ground-truth batch

and after every periodic evaluation `thr = min(thr + threshold_step, 1)` when the evaluation
cross-entropy rose by at least `loss_eps` over the last one that raised it (`prev` moves only
then). Defaults: init_threshold 0, loss_eps 0.1, threshold step 0.1, capacity 1000 sequences
(the GPT-2 scripts'). Student samples continue a prompt of `prompt_length` tokens of the
window for `max_new_tokens` tokens at temperature 1 (top-k off, as the scripts), and the loss
covers the sampled tokens. The replay buffer is method state: a resumed run continues with it.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import losses, validation
from kdjax.methods import base, lm_fused, on_policy

DIVERGENCES = {"skew_fkl": losses.skew_forward_kl, "skew_rkl": losses.skew_reverse_kl}
_FRESH, _REPLAY, _DATA = 0, 1, 2


class DistiLLM(base.Method):
  """Skew KL + adaptive off-policy student-generated outputs (module docstring)."""
  name = "distillm"
  family = "language model"
  paper = "Ko et al. 2024"
  field_help = {
      "divergence": "'skew_fkl' or 'skew_rkl'",
      "alpha": "skew of the divergence",
      "temperature": "softmax temperature of the divergence",
      "init_threshold": "initial probability of training on student samples",
      "threshold_step": "raise of that probability when the eval loss rises",
      "loss_eps": "eval-loss rise that triggers the raise",
      "capacity": "sequences kept in the replay buffer",
      "fused": lm_fused.FIELD_HELP,
  }
  # Its rewrite replaces the tokens the teacher sees (the student's samples).
  teacher_needs = base.TeacherNeeds(on_batch_inputs=False)
  non_negative_fields = ("loss_eps", "threshold_step")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        divergence="skew_fkl", alpha=0.1, init_threshold=0.0, loss_eps=0.1, threshold_step=0.1,
        capacity=1000, temperature=1.0, prompt_length=0, max_new_tokens=0,
        num_train_steps=1000, fused="auto"))

  def __init__(self, config):
    super().__init__(config)
    validation.one_of("config.distillm.divergence", config.divergence, DIVERGENCES)
    base.check_interval(config, self.name, "alpha", 0.0, 1.0, high_inclusive=False)
    base.check_interval(config, self.name, "init_threshold", 0.0, 1.0)
    for field in ("capacity", "num_train_steps"):
      base.check_positive_int(config, self.name, field)
    for field in ("prompt_length", "max_new_tokens"):
      validation.require(config[field], validation.NON_NEGATIVE_INT, f"config.distillm.{field}")
    lm_fused.check_mode(config, self.name)

  def init(self, rng, sample):
    del rng
    length = sample.student.logits.shape[1]
    capacity = self.config.capacity
    return {}, {
        "tokens": jnp.zeros((capacity, length), jnp.int32),
        "targets": jnp.zeros((capacity, length), jnp.int32),
        "mask": jnp.zeros((capacity, length), bool),
        "count": jnp.zeros((), jnp.int32),  # Sequences in the buffer (at most capacity).
        "position": jnp.zeros((), jnp.int32),  # Where the next one is written (a ring).
        "threshold": jnp.asarray(self.config.init_threshold, jnp.float32),
        "previous_loss": jnp.asarray(np.inf, jnp.float32),  # No evaluation yet.
    }

  def source(self, state, step, r):
    """Which data a step trains on: 0 fresh samples, 1 replay, 2 ground truth."""
    threshold = state["threshold"]
    progress = step.astype(jnp.float32) / self.config.num_train_steps
    sample_threshold = threshold * (1.0 - progress)
    full = state["count"] >= self.config.capacity
    fresh = (r < sample_threshold) | ((r < threshold) & ~full)
    return jnp.where(fresh, _FRESH, jnp.where(r < threshold, _REPLAY, _DATA))

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    c = self.config
    prompt_length, new_tokens = on_policy.split_lengths(c, batch["tokens"].shape[1], self.name)
    choice_rng, sample_rng, replay_rng = jax.random.split(rng, 3)
    keys = lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])

    def fresh(state):
      sequences = on_policy.generate_sequences(
          models.student_apply, models.student_variables, batch["tokens"][:, :prompt_length],
          keys(sample_rng), max_new_tokens=new_tokens, temperature=c.temperature,
          greedy=False)
      rewritten = on_policy.sequences_to_batch(batch, sequences, prompt_length)
      return rewritten, self._push(state, rewritten, ops)

    def replay(state):
      rows = jax.vmap(lambda key: jax.random.randint(key, (), 0, state["count"]))(
          keys(replay_rng))
      return dict(batch, tokens=state["tokens"][rows], targets=state["targets"][rows],
                  mask=state["mask"][rows].astype(batch["mask"].dtype)), state

    def data(state):
      return batch, state

    r = jax.random.uniform(choice_rng)
    source = self.source(state, step, r)
    rewritten, state = jax.lax.switch(source, (fresh, replay, data), state)
    return dict(rewritten, distillm_source=jnp.full(batch["index"].shape, source)), state

  def _push(self, state, batch, ops):
    """Writes the global batch's sequences into the ring buffer (every replica the same)."""
    capacity = self.config.capacity
    tokens, targets, mask = (ops.gather(batch[k]) for k in ("tokens", "targets", "mask"))
    rows = (state["position"] + jnp.arange(tokens.shape[0])) % capacity
    return dict(state, tokens=state["tokens"].at[rows].set(tokens),
                targets=state["targets"].at[rows].set(targets),
                mask=state["mask"].at[rows].set(mask.astype(bool)),
                count=jnp.minimum(state["count"] + tokens.shape[0], capacity),
                position=(state["position"] + tokens.shape[0]) % capacity)

  def after_evaluation(self, state, eval_metrics):
    """The adaptive threshold's update from an evaluation's cross-entropy (host side)."""
    loss = float(eval_metrics["cross_entropy"])
    previous = float(state["previous_loss"])
    if not np.isfinite(previous):  # The first evaluation only sets the reference.
      return dict(state, previous_loss=np.float32(loss))
    if loss >= previous + self.config.loss_eps:
      threshold = min(float(state["threshold"]) + self.config.threshold_step, 1.0)
      return dict(state, threshold=np.float32(threshold), previous_loss=np.float32(loss))
    return state

  def loss(self, params, state, batch, ops):
    c = self.config
    fused = lm_fused.use_fused(c.fused, batch, self.name)
    divergence = ops.mean(lm_fused.divergence(DIVERGENCES[c.divergence], batch, fused=fused,
                                              alpha=c.alpha), batch.where)
    source = batch.data.get("distillm_source", jnp.full((1,), _DATA))
    # Fused, the accuracy would cost a pass over the vocabulary of its own: not reported.
    accuracy = {} if fused else {"accuracy": base.accuracy(batch, ops)}
    return divergence, {"loss": divergence, c.divergence: divergence,
                        "fresh_samples": jnp.mean(source == _FRESH),
                        "replayed": jnp.mean(source == _REPLAY),
                        "threshold": state["threshold"], **accuracy}, state


METHODS = (DistiLLM,)
