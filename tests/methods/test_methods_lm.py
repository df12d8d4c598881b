"""Language-model methods in the real train step: GKD, sequence-level KD, AdaSPEC.

Models are `lm_tiny` Transformers (vocabulary 259, 16-token windows); every step is compiled
once per method (module-scoped fixtures).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.lm.generate import generate_fn
from kdjax.methods import adaspec as adaspec_lib
from kdjax.methods import base, on_policy, single_device_ops
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib
from methods_helpers import build

VOCAB, LENGTH, BATCH, PROMPT, NEW = 259, 16, 4, 6, 8


@pytest.fixture(scope="module")
def lm():
  module = models.get_model("lm_tiny", num_classes=VOCAB)
  apply = models.apply_fn(module)
  tokens = np.zeros((2, LENGTH), np.int32)
  student = models.init_variables(module, jax.random.PRNGKey(1), tokens)
  teacher = models.init_variables(module, jax.random.PRNGKey(2), tokens)
  rng = np.random.default_rng(0)
  window = rng.integers(0, 256, size=(BATCH, LENGTH + 1)).astype(np.int32)
  batch = {"tokens": window[:, :-1], "targets": window[:, 1:],
           "mask": np.ones((BATCH, LENGTH), bool), "index": np.arange(BATCH, dtype=np.int32)}
  return apply, student, teacher, batch


def _state(method, apply, student, teacher, num_train_examples=BATCH):
  method.prepare(base.RunFacts(num_train_examples=num_train_examples))
  logits, _ = apply(student, jnp.zeros((2, LENGTH), jnp.int32), train=False)
  sample = base.Batch(student=logits, teacher=logits, labels=jnp.zeros((2, LENGTH), jnp.int32),
                      where=jnp.ones((2, LENGTH), bool), step=jnp.zeros((), jnp.int32),
                      student_variables=student)
  params, method_state = method.init(jax.random.PRNGKey(3), sample)
  optimizer = optax.sgd(0.5)
  return optimizer, state_lib.create(student_variables=student, method_params=params,
                                     method_state=method_state, optimizer=optimizer,
                                     rng=jax.random.PRNGKey(4))


def _step(method, lm):
  apply, student, teacher, batch = lm
  optimizer, state = _state(method, apply, student, teacher)
  step = jax.jit(lambda s, t, b: step_lib.make_train_step(
      student_apply=apply, teacher_apply=apply, method=method, optimizer=optimizer)(
          s, t, b, single_device_ops()))
  return step, state


def test_gkd_with_lmbda_0_is_jsd_loss_and_update(lm):
  """lmbda 0: the batch is used as it is, and the loss is TRL's generalized JSD at T=1."""
  _, _, teacher, batch = lm
  gkd = build("gkd", lmbda=0.0, beta=0.3, temperature=0.7)
  jsd = build("jsd", beta=0.3, temperature=1.0)
  (gkd_step, state), (jsd_step, _) = _step(gkd, lm), _step(jsd, lm)
  gkd_state, gkd_metrics = gkd_step(state, teacher, batch)
  jsd_state, jsd_metrics = jsd_step(state, teacher, batch)
  np.testing.assert_allclose(gkd_metrics["loss"], jsd_metrics["loss"], rtol=1e-6)
  assert float(gkd_metrics["on_policy"]) == 0.0
  # One SGD step from the same state: equal parameters means equal gradients.
  for a, b in zip(jax.tree.leaves(gkd_state.params), jax.tree.leaves(jsd_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gkd_with_lmbda_1_trains_only_on_student_samples(lm):
  apply, student, teacher, batch = lm
  gkd = build("gkd", lmbda=1.0, beta=0.5, temperature=1.0, prompt_length=PROMPT,
              max_new_tokens=NEW)
  step, state = _step(gkd, lm)
  _, metrics = step(state, teacher, batch)
  assert float(metrics["on_policy"]) == 1.0
  # The data's continuation (everything after the prompt) cannot matter.
  changed = dict(batch, tokens=batch["tokens"].copy(), targets=batch["targets"].copy())
  changed["tokens"][:, PROMPT:] = 7
  changed["targets"][:, PROMPT - 1:] = 9
  _, changed_metrics = step(state, teacher, changed)
  np.testing.assert_allclose(metrics["loss"], changed_metrics["loss"], rtol=1e-6)
  # The rewritten batch is the prompt + the student's own samples, loss mask on them only.
  models_ = base.StepModels(apply, student, apply, teacher)
  rng = jax.random.PRNGKey(11)
  rewritten, _ = gkd.rewrite_batch({}, batch, models_, rng, single_device_ops(), 0)
  _, sample_rng = jax.random.split(rng)
  expected = generate_fn(
      apply, student, jnp.asarray(batch["tokens"][:1, :PROMPT]), max_new_tokens=NEW,
      rng=jax.random.fold_in(sample_rng, 0), temperature=1.0).tokens[0]
  np.testing.assert_array_equal(rewritten["tokens"][0, :PROMPT + NEW - 1], expected[:-1])
  np.testing.assert_array_equal(rewritten["targets"][0, :PROMPT + NEW - 1], expected[1:])
  mask = np.asarray(rewritten["mask"][0])
  assert mask.sum() == NEW and mask[PROMPT - 1:PROMPT - 1 + NEW].all()


def test_gkd_draw_uses_lmbda():
  """Over many steps the on-policy fraction follows lmbda (one draw per step)."""
  rng = jax.random.PRNGKey(0)
  draws = [float(jax.random.uniform(jax.random.split(jax.random.fold_in(rng, i))[0]) < 0.3)
           for i in range(400)]
  assert 0.24 < np.mean(draws) < 0.36


def test_seq_kd_generates_each_window_once_then_reads_it_back(lm):
  apply, student, teacher, batch = lm
  seq_kd = build("seq_kd", prompt_length=PROMPT, max_new_tokens=NEW)
  optimizer, state = _state(seq_kd, apply, student, teacher, num_train_examples=10)
  models_ = base.StepModels(apply, student, apply, teacher)
  ops = single_device_ops()
  rewritten, method_state = seq_kd.rewrite_batch(state.method_state, batch, models_,
                                                 jax.random.PRNGKey(0), ops, 0)
  greedy = generate_fn(apply, teacher, jnp.asarray(batch["tokens"][:, :PROMPT]),
                                    max_new_tokens=NEW, greedy=True).tokens
  np.testing.assert_array_equal(method_state["generations"][:BATCH], greedy)
  assert np.asarray(method_state["generated"]).tolist() == [True] * BATCH + [False] * 6
  np.testing.assert_array_equal(rewritten["tokens"][:, :PROMPT + NEW - 1], greedy[:, :-1])
  # Second time: read from the state, not regenerated (a changed teacher changes nothing).
  other = base.StepModels(apply, student, apply, student)
  again, _ = seq_kd.rewrite_batch(method_state, batch, other, jax.random.PRNGKey(5), ops, 1)
  np.testing.assert_array_equal(again["tokens"], rewritten["tokens"])
  del optimizer


def test_seq_kd_pregenerates_every_window_as_the_step_would(lm):
  """`pregenerate` (before the first step, in batches that do not divide the windows) gives
  each window the continuation the in-step path gives it (greedy)."""
  apply, student, teacher, batch = lm

  class Windows:  # The pipeline's offline access: 6 windows, the first 4 are `batch`'s.
    sequence_length = LENGTH
    tokens = np.concatenate([batch["tokens"], batch["tokens"][:2, ::-1]])

    def training_windows(self, indices):
      return {"tokens": self.tokens[indices]}

  seq_kd = build("seq_kd", prompt_length=PROMPT, max_new_tokens=NEW, pregenerate_batch_size=4)
  _, state = _state(seq_kd, apply, student, teacher, num_train_examples=6)
  filled = seq_kd.pregenerate(jax.device_get(state.method_state), Windows(),
                              teacher_apply=apply, teacher_variables=teacher, seed=0)
  assert np.asarray(filled["generated"]).all()
  greedy = generate_fn(apply, teacher, jnp.asarray(Windows.tokens[:, :PROMPT]),
                       max_new_tokens=NEW, greedy=True).tokens
  np.testing.assert_array_equal(filled["generations"], greedy)
  rewritten, _ = seq_kd.rewrite_batch(filled, batch, base.StepModels(apply, student, apply,
                                                                     student),
                                      jax.random.PRNGKey(0), single_device_ops(), 0)
  np.testing.assert_array_equal(rewritten["tokens"][:, :PROMPT + NEW - 1], greedy[:4, :-1])
  off = build("seq_kd", pregenerate=False)
  assert off.pregenerate(filled, None, teacher_apply=None, teacher_variables=None,
                         seed=0) is filled


def test_masked_quantile_is_torch_quantile_on_the_selected_values():
  rng = np.random.default_rng(0)
  for count in (1, 2, 7, 30):
    values = rng.normal(size=(5, 8)).astype(np.float32)
    where = np.zeros(40, bool)
    where[rng.choice(40, count, replace=False)] = True
    where = where.reshape(5, 8)
    for q in (0.0, 0.3, 0.6, 1.0):
      got = adaspec_lib.masked_quantile(jnp.asarray(values), jnp.asarray(where), q)
      np.testing.assert_allclose(got, np.quantile(values[where], q), rtol=1e-6)


def test_adaspec_keeps_the_top_fraction_of_delta_by_hand():
  rng = np.random.default_rng(1)
  student, teacher, reference = (jnp.asarray(rng.normal(size=(3, 5, 7)) * s, jnp.float32)
                                 for s in (1.0, 2.0, 1.5))
  where = np.ones((3, 5), bool)
  where[2, 3:] = False
  method = build("adaspec", keep_fraction=0.4)
  batch = base.Batch(student=models.Output(student, {}), teacher=models.Output(teacher, {}),
                     labels=jnp.zeros((3, 5), jnp.int32), where=jnp.asarray(where),
                     step=jnp.zeros((), jnp.int32),
                     data={adaspec_lib.REFERENCE_LOGITS_KEY: reference})
  loss, metrics, _ = method.loss({}, {}, batch, single_device_ops())

  def kl(p_logits, q_logits):  # KL(p || q) per token, float64.
    p = np.exp(_log_softmax(p_logits))
    return np.sum(p * (_log_softmax(p_logits) - _log_softmax(q_logits)), -1)

  draft, ref = kl(teacher, student), kl(teacher, reference)
  delta = draft - ref
  threshold = np.quantile(delta[where], 0.6)
  keep = where & (delta >= threshold)
  np.testing.assert_allclose(loss, draft[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kept_fraction"], keep.sum() / where.sum(), rtol=1e-6)
  # 13 tokens: the 0.6-quantile lies between the 8th and 9th smallest delta, 5 are kept.
  assert keep.sum() == 5


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_lm_split_lengths_refuse_what_does_not_fit():
  method = build("gkd", prompt_length=10, max_new_tokens=10)
  with pytest.raises(ValueError, match="prompt_length=10 .*max_new_tokens=10 must fit the "
                     "sequence length 16"):
    on_policy.split_lengths(method.config, 16, "gkd")
  assert on_policy.split_lengths(build("gkd").config, 16, "gkd") == (8, 8)


def test_bad_lm_method_fields_name_the_field():
  with pytest.raises(ValueError, match="config.gkd.lmbda"):
    build("gkd", lmbda=1.5)
  with pytest.raises(ValueError, match="config.adaspec.keep_fraction"):
    build("adaspec", keep_fraction=0.0)
  config = build("seq_kd").config
  with config.unlocked():
    del config["greedy"]
    config.greedy = "yes"
  with pytest.raises(ValueError, match="config.seq_kd.greedy must be True or False"):
    on_policy.SeqKD(config)
