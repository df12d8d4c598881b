"""Language-model distillation on generated sequences: on-policy GKD and sequence-level KD.

Both rewrite the batch inside the jitted train step (`Method.rewrite_batch`) before the teacher
and the student run on it. A window of the packed corpus, `tokens` [b, T], is split into a
prompt (its first `prompt_length` tokens) and a continuation of `max_new_tokens` tokens that a
model generates (`kdjax.lm.generate`); the loss is computed on the generated tokens only
(`mask` is True on the targets that are generated tokens), as TRL's `GKDTrainer` computes it on
the completion.

Sampling keys are drawn per example from (`Batch.rng`, the example's `index`), so the samples do
not depend on how the batch is split over devices.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import losses, validation
from kdjax.methods import base, lm_fused
from kdjax.teachers import keys as teacher_keys


# Cached teacher logits in a batch, which the step reads instead of running the teacher.
TEACHER_LOGITS_KEY = teacher_keys.LOGITS_KEY


def generate_sequences(apply_fn, variables, prompts, keys, *, max_new_tokens, temperature, greedy,
              top_k=0, top_p=1.0):
  """`prompts` [b, P] -> [b, P + N] tokens, row i sampled with `keys[i]`."""
  from kdjax.lm.generate import generate_fn  # pylint: disable=g-import-not-at-top

  def one(prompt, key):
    out = generate_fn(
        apply_fn, variables, prompt[None], max_new_tokens=max_new_tokens, rng=key,
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return out.tokens[0]

  return jax.vmap(one)(prompts, keys)


def split_lengths(config, sequence_length: int, method: str) -> Tuple[int, int]:
  """(prompt_length, max_new_tokens) for windows of `sequence_length` tokens: 0 means half the
  window for the prompt and the rest of it for the continuation."""
  prompt = config.prompt_length or sequence_length // 2
  new = config.max_new_tokens or sequence_length - prompt
  if prompt < 1 or prompt + new > sequence_length:
    raise validation.ConfigError(
        f"config.{method}.prompt_length={prompt} + config.{method}.max_new_tokens={new} must fit "
        f"the sequence length {sequence_length} (prompt at least 1 token).")
  return prompt, new


def sequences_to_batch(batch: dict, sequences: jax.Array, prompt_length: int) -> dict:
  """`batch` with its windows replaced by `sequences` [b, P + N] (prompt + generated): tokens
  and targets shifted by one, padded to the window length T, and `mask` True exactly on the
  targets that are generated tokens (positions P - 1 ... P + N - 2)."""
  length = batch["tokens"].shape[1]
  width = sequences.shape[1] - 1
  pad = lambda x: jnp.pad(x, ((0, 0), (0, length - width)))
  positions = jnp.arange(length)
  generated = (positions >= prompt_length - 1) & (positions < width)
  mask = jnp.broadcast_to(generated, batch["tokens"].shape).astype(batch["mask"].dtype)
  return dict(batch, tokens=pad(sequences[:, :-1]).astype(batch["tokens"].dtype),
              targets=pad(sequences[:, 1:]).astype(batch["targets"].dtype), mask=mask)


def _row_keys(rng, index):
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


class GKD(base.Method):
  """Generalized knowledge distillation (Agarwal et al., ICLR 2024), as TRL's `GKDTrainer`.

  With probability `lmbda` (one draw per step, the same on every device) the batch's
  continuations are replaced by the current student's samples (`temperature`, `top_k`,
  `top_p`; `max_new_tokens` after a prompt of `prompt_length` tokens) and the loss covers the
  sampled tokens; otherwise the batch is used as it is. The loss is the generalized JSD with
  mixture weight `beta` at temperature 1 (TRL: `temperature` is the sampling temperature only).
  So `lmbda=0` is `jsd` with the same `beta`, and `lmbda=1` trains only on student samples.
  Defaults: TRL's `GKDConfig` (lmbda 0.5, beta 0.5, temperature 0.9, top-k off).
  """
  name = "gkd"
  family = "language model"
  paper = "Agarwal et al. 2024"
  field_help = {
      "lmbda": "probability that a step trains on the student's own samples",
      "beta": "generalized JSD mixture weight (0 forward KL, 1 reverse KL)",
      "temperature": "sampling temperature of the student's continuations",
      "top_k": "top-k of the sampling (0: off)",
      "top_p": "nucleus top-p of the sampling (1: off)",
      "fused": lm_fused.FIELD_HELP,
  }
  # Cached teacher logits (`kdjax.teachers.process_logits`) stay right through the rewrite:
  # the off-policy batch keeps its windows, and the on-policy one gets the teacher's logits on
  # the student's samples (`rewrite_batch`), so the step never runs the teacher itself.
  teacher_needs = base.TeacherNeeds(on_batch_inputs=True)
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        lmbda=0.5, beta=0.5, temperature=0.9, top_k=0, top_p=1.0, prompt_length=0,
        max_new_tokens=0, ce_weight=0.0, kd_weight=1.0, fused="auto"))

  def __init__(self, config):
    super().__init__(config)
    base.check_interval(config, self.name, "lmbda", 0.0, 1.0)
    base.check_interval(config, self.name, "beta", 0.0, 1.0)
    base.check_interval(config, self.name, "top_p", 0.0, 1.0, low_inclusive=False)
    for field in ("top_k", "prompt_length", "max_new_tokens"):
      validation.require(config[field], validation.NON_NEGATIVE_INT, f"config.gkd.{field}")
    lm_fused.check_mode(config, self.name)

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del step
    c = self.config
    if c.lmbda == 0:
      return dict(batch, on_policy=jnp.zeros(batch["index"].shape, jnp.float32)), state
    prompt_length, new_tokens = split_lengths(c, batch["tokens"].shape[1], self.name)
    choice_rng, sample_rng = jax.random.split(rng)

    def on_policy(batch):
      sequences = generate_sequences(
          models.student_apply, models.student_variables, batch["tokens"][:, :prompt_length],
          _row_keys(sample_rng, batch["index"]), max_new_tokens=new_tokens,
          temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, greedy=False)
      rewritten = sequences_to_batch(batch, sequences, prompt_length)
      if TEACHER_LOGITS_KEY in batch:  # The cached logits are the dataset windows'.
        logits = models.teacher_apply(models.teacher_variables, rewritten["tokens"],
                                      train=False, rng=None)[0].logits
        rewritten[TEACHER_LOGITS_KEY] = jax.lax.stop_gradient(
            logits.astype(batch[TEACHER_LOGITS_KEY].dtype))
      return dict(rewritten, on_policy=jnp.ones(batch["index"].shape, jnp.float32))

    def off_policy(batch):
      return dict(batch, on_policy=jnp.zeros(batch["index"].shape, jnp.float32))

    if c.lmbda == 1:
      return on_policy(batch), state
    # One draw for the whole step (rng is the same on every device): TRL's per-step choice.
    use_student = jax.random.uniform(choice_rng) < c.lmbda
    return jax.lax.cond(use_student, on_policy, off_policy, batch), state

  def loss(self, params, state, batch, ops):
    c = self.config
    fused = lm_fused.use_fused(c.fused, batch, self.name)
    ce, ce_metrics = lm_fused.ce_and_accuracy(batch, ops, fused=fused, ce_weight=c.ce_weight)
    jsd = ops.mean(lm_fused.divergence(losses.generalized_jsd, batch, fused=fused, beta=c.beta,
                                       temperature=1.0), batch.where)
    loss = c.ce_weight * ce + c.kd_weight * jsd
    # Set by `rewrite_batch` (absent when the loss is traced alone, e.g. by shape checks).
    on_policy = jnp.mean(batch.data.get("on_policy", jnp.zeros(())))
    return loss, {"loss": loss, "jsd": jsd, "on_policy": on_policy, **ce_metrics}, state


class SeqKD(base.Method):
  """Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016): the student is trained
  with cross-entropy on the teacher's own continuations of each training prompt (greedy
  decoding, the usual stand-in for the paper's beam search; or sampled at
  `sample_temperature`), plus optionally word-level KD on them (`kd_weight`, Kim & Rush's
  "Seq-KD + Word-KD").

  The teacher is frozen, so each training window's continuation is generated once and kept in
  the method state (`generations` [N, P + N_new], `generated` [N]) like Kim & Rush's offline
  pseudo-label set: with `pregenerate` (default) for every window before the first step, in
  batches of `pregenerate_batch_size` (decoding is sequential in the new tokens: one batch of
  256 windows, 96 new tokens, costs ~9 s on 2 CPU cores, against ~1 s for 8); otherwise the first time a
  window is drawn, inside the train step. The state is checkpointed, so a resumed run reads
  the same continuations.
  """
  name = "seq_kd"
  family = "language model"
  paper = "Kim & Rush 2016"
  field_help = {
      "ce_weight": "weight of the cross-entropy on the teacher's continuations",
      "kd_weight": "weight of word-level KD on those continuations (0: none)",
      "greedy": "True: greedy continuations; False: sampled at sample_temperature",
      "sample_temperature": "sampling temperature when greedy is False",
      "pregenerate": "generate every window's continuation before the first step",
      "pregenerate_batch_size": "windows decoded together when pregenerating",
  }
  # The student trains on the teacher's generations, not on the batch's own tokens.
  teacher_needs = base.TeacherNeeds(on_batch_inputs=False)
  non_negative_fields = ("ce_weight", "kd_weight")
  positive_fields = ("temperature", "sample_temperature")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=1.0, greedy=True, sample_temperature=1.0,
        prompt_length=0, max_new_tokens=0, pregenerate=True, pregenerate_batch_size=256))

  def __init__(self, config):
    super().__init__(config)
    if not isinstance(config.greedy, bool):
      raise validation.ConfigError(
          f"config.seq_kd.greedy must be True or False, got {config.greedy!r}.")
    for field in ("prompt_length", "max_new_tokens"):
      validation.require(config[field], validation.NON_NEGATIVE_INT, f"config.seq_kd.{field}")
    if not isinstance(config.pregenerate, bool):
      raise validation.ConfigError(
          f"config.seq_kd.pregenerate must be True or False, got {config.pregenerate!r}.")
    validation.require(config.pregenerate_batch_size, validation.POSITIVE_INT,
                       "config.seq_kd.pregenerate_batch_size")

  def pregenerate(self, state, pipeline, *, teacher_apply, teacher_variables, seed: int):
    """`state` with every training window's continuation generated by the teacher (host
    arrays), when `config.pregenerate`; row keys fold the window index into `seed`'s key."""
    c = self.config
    if not c.pregenerate:
      return state
    generations = np.array(state["generations"])
    prompt_length, new_tokens = split_lengths(c, pipeline.sequence_length, self.name)
    if c.greedy:  # No keys: the whole batch decodes as one (2.5x faster than rows vmapped).
      from kdjax.lm.generate import generate_fn  # pylint: disable=g-import-not-at-top
      generate = jax.jit(lambda variables, prompts, keys: generate_fn(
          teacher_apply, variables, prompts, max_new_tokens=new_tokens, greedy=True).tokens)
    else:
      generate = jax.jit(lambda variables, prompts, keys: generate_sequences(
          teacher_apply, variables, prompts, keys, max_new_tokens=new_tokens,
          temperature=c.sample_temperature, greedy=False))
    key = jax.random.PRNGKey(seed)
    size, count = c.pregenerate_batch_size, len(generations)
    for begin in range(0, count, size):
      chunk = np.arange(begin, min(begin + size, count))
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])  # One shape.
      prompts = pipeline.training_windows(padded)["tokens"][:, :prompt_length]
      sequences = generate(teacher_variables, prompts, _row_keys(key, padded))
      generations[chunk] = np.asarray(sequences)[:len(chunk)]
    return dict(state, generations=generations, generated=np.ones(count, bool))

  def init(self, rng, sample):
    del rng
    if self.facts.num_train_examples is None:
      raise ValueError("seq_kd keeps one generation per training window; build it with "
                       "build_method(config, num_train_examples=N).")
    length = sample.student.logits.shape[1]
    prompt_length, new_tokens = split_lengths(self.config, length, self.name)
    size = self.facts.num_train_examples
    return {}, {"generations": jnp.zeros((size, prompt_length + new_tokens), jnp.int32),
                "generated": jnp.zeros((size,), bool)}

  def rewrite_batch(self, state, batch, models, rng, ops, step):
    del step
    c = self.config
    prompt_length, new_tokens = split_lengths(c, batch["tokens"].shape[1], self.name)
    index = batch["index"]

    def generate(state):
      sequences = generate_sequences(
          models.teacher_apply, models.teacher_variables, batch["tokens"][:, :prompt_length],
          _row_keys(rng, index), max_new_tokens=new_tokens, temperature=c.sample_temperature,
          greedy=c.greedy).astype(jnp.int32)
      # Every device stores every device's rows, so the replicated state stays identical.
      all_index, all_sequences = ops.gather(index), ops.gather(sequences)
      return sequences, {"generations": state["generations"].at[all_index].set(all_sequences),
                         "generated": state["generated"].at[all_index].set(True)}

    def reuse(state):
      return state["generations"][index], state

    # Decided on the global batch, so that every device takes the same branch.
    missing = ~jnp.all(ops.gather(state["generated"][index]))
    sequences, state = jax.lax.cond(missing, generate, reuse, state)
    return sequences_to_batch(batch, sequences, prompt_length), state

  def loss(self, params, state, batch, ops):
    c = self.config
    ce = base.cross_entropy(batch, ops)
    loss = c.ce_weight * ce
    metrics = {"ce": ce}
    if c.kd_weight:
      kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                              temperature=c.temperature, where=batch.where), batch.where)
      loss = loss + c.kd_weight * kd
      metrics["kd"] = kd
    return loss, dict(metrics, loss=loss, accuracy=base.accuracy(batch, ops)), state


METHODS = (GKD, SeqKD)
