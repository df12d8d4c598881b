"""The `uld` method (kdjax.methods.uld): CE + lambda * ULD with a teacher of another
vocabulary, on one tokenization and on two (the teacher's own 'teacher_tokens'), through the
train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods
from kdjax.methods import base
from kdjax.methods import uld as uld_lib
from kdjax.models.output import Output
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib

OPS = base.single_device_ops()
V_STUDENT, V_TEACHER = 11, 17


def _reference(student, teacher, student_where, teacher_where, ts=1.0, tt=1.0):
  """Mean over aligned tokens of the L1 between sorted, zero-padded probabilities (float64),
  k-th completion token with k-th."""
  def probs(z, t):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max())
    return np.sort(e / e.sum())[::-1]
  width = max(student.shape[-1], teacher.shape[-1])
  pad = lambda p: np.pad(p, (0, width - p.size))
  values = []
  for b in range(student.shape[0]):
    s_pos, t_pos = np.flatnonzero(student_where[b]), np.flatnonzero(teacher_where[b])
    for k in range(min(len(s_pos), len(t_pos))):
      values.append(np.abs(pad(probs(student[b, s_pos[k]], ts))
                           - pad(probs(teacher[b, t_pos[k]], tt))).sum())
  return np.mean(values)


def _ce(student, labels, where):
  z = np.asarray(student, np.float64)
  log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
      -1, keepdims=True)
  nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
  return nll[where].mean()


def test_defaults_and_declarations():
  config = uld_lib.ULD.default_config()
  assert (config.ce_weight, config.uld_weight) == (1.0, 1.5)
  assert methods.METHODS["uld"] is uld_lib.ULD
  assert uld_lib.ULD.family == "language model" and uld_lib.ULD.paper


def test_one_tokenization_two_vocabularies():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 6, V_STUDENT)).astype(np.float32)
  teacher = rng.normal(size=(2, 6, V_TEACHER)).astype(np.float32)
  labels = rng.integers(0, V_STUDENT, (2, 6))
  where = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  method = uld_lib.ULD(uld_lib.ULD.default_config())
  batch = base.Batch(student=Output(jnp.asarray(student), {}),
                     teacher=Output(jnp.asarray(teacher), {}), labels=jnp.asarray(labels),
                     where=jnp.asarray(where), step=jnp.int32(0))
  loss, metrics, _ = method.loss({}, {}, batch, OPS)
  want_uld = _reference(student, teacher, where, where)
  np.testing.assert_allclose(float(metrics["uld"]), want_uld, rtol=1e-5)
  np.testing.assert_allclose(float(loss), _ce(student, labels, where) + 1.5 * want_uld,
                             rtol=1e-5)
  assert float(metrics["uld_aligned_fraction"]) == 1.0


def _embedding_lm(vocab, seed):
  """A tiny LM: logits = embedding[tokens] @ W ([b, T, vocab])."""
  key = jax.random.PRNGKey(seed)
  variables = {"params": {"embed": jax.random.normal(key, (vocab, 4)),
                          "out": jax.random.normal(jax.random.fold_in(key, 1), (4, vocab))}}
  seen = []

  def apply(variables, tokens, *, train=False, rng=None):
    del train, rng
    seen.append(tokens.shape)
    p = variables["params"]
    return Output(p["embed"][tokens] @ p["out"], {}), {}
  return apply, variables, seen


def test_two_tokenizations_through_the_train_step():
  """The teacher runs on its own tokens (never on the student's), and the step's loss is
  CE + 1.5 * ULD with completions aligned from their start."""
  student_apply, student_variables, _ = _embedding_lm(V_STUDENT, 0)
  teacher_apply, teacher_variables, teacher_seen = _embedding_lm(V_TEACHER, 1)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, V_STUDENT, (2, 6))
  targets = rng.integers(0, V_STUDENT, (2, 6))
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  teacher_tokens = rng.integers(0, V_TEACHER, (2, 9))
  teacher_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]], bool)
  batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets),
           "mask": jnp.asarray(mask), "index": jnp.arange(2),
           uld_lib.TEACHER_TOKENS_KEY: jnp.asarray(teacher_tokens),
           uld_lib.TEACHER_MASK_KEY: jnp.asarray(teacher_mask)}
  method = uld_lib.ULD(uld_lib.ULD.default_config())
  optimizer = optax.sgd(0.0)
  train_state = state_lib.create(student_variables=student_variables, method_params={},
                                 method_state={}, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  step = step_lib.make_train_step(student_apply=student_apply, teacher_apply=teacher_apply,
                                  method=method, optimizer=optimizer)
  _, metrics = jax.jit(lambda s, t, b: step(s, t, b, OPS))(train_state, teacher_variables,
                                                           batch)
  assert teacher_seen and all(shape == (2, 9) for shape in teacher_seen)

  student = np.asarray(student_apply(student_variables, jnp.asarray(tokens))[0].logits)
  teacher = np.asarray(teacher_apply(teacher_variables, jnp.asarray(teacher_tokens))[0].logits)
  want_uld = _reference(student, teacher, mask, teacher_mask)
  np.testing.assert_allclose(float(metrics["uld"]), want_uld, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]),
                             _ce(student, targets, mask) + 1.5 * want_uld, rtol=1e-5)
  # Row 0: 3 student tokens against 4 teacher tokens; row 1: 5 against 3.
  np.testing.assert_allclose(float(metrics["uld_aligned_fraction"]), 6 / 8)


def test_teacher_tokens_without_their_mask_are_refused():
  method = uld_lib.ULD(uld_lib.ULD.default_config())
  batch = base.Batch(student=Output(jnp.zeros((1, 2, 3)), {}),
                     teacher=Output(jnp.zeros((1, 2, 4)), {}), labels=jnp.zeros((1, 2), int),
                     where=jnp.ones((1, 2), bool), step=jnp.int32(0),
                     data={uld_lib.TEACHER_TOKENS_KEY: jnp.zeros((1, 2), int)})
  with pytest.raises(ValueError, match="teacher_mask"):
    method.loss({}, {}, batch, OPS)
