"""Every trace-time argument check raises with the function name first."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest

from kdjax import losses

S = jnp.zeros((2, 3, 5))
T = jnp.zeros((2, 3, 5))
Y = jnp.zeros((2, 3), jnp.int32)
W = jnp.ones((2, 3), bool)
TOPK_VALUES = jnp.zeros((2, 3, 2))
TOPK_INDICES = jnp.zeros((2, 3, 2), jnp.int32)

PAIR_LOSSES = {
    "kd": losses.kd,
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "generalized_jsd": losses.generalized_jsd,
    "skew_forward_kl": losses.skew_forward_kl,
    "skew_reverse_kl": losses.skew_reverse_kl,
    "total_variation": losses.total_variation,
    "dist": losses.dist,
    "dkd": lambda s, t, **kw: losses.dkd(s, t, jnp.zeros(s.shape[:-1],
                                                         jnp.int32), **kw),
    "nkd": lambda s, t, **kw: losses.nkd(s, t, jnp.zeros(s.shape[:-1],
                                                         jnp.int32), **kw),
    "taid": lambda s, t, **kw: losses.taid(s, t, t=0.5, **kw),
}


@contextlib.contextmanager
def _raises(exc, name, *fragments):
  """Expects `exc` whose message starts with `name:` and has every fragment."""
  with pytest.raises(exc) as info:
    yield
  message = str(info.value)
  assert message.startswith(name + ":"), message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_shape_errors(name):
  fn = PAIR_LOSSES[name]
  with _raises(ValueError, name, "vocabulary/class sizes differ",
               "student V=5 teacher V=4", "(2, 3, 5)", "(2, 3, 4)"):
    fn(S, T[..., :4])
  with _raises(ValueError, name, "(2, 3, 5)", "(3, 3, 5)"):
    fn(S, jnp.zeros((3, 3, 5)))
  with _raises(ValueError, name, "(2, 3, 5)", "(3, 5)"):
    fn(S, T[0])
  with _raises(TypeError, name, "floating", "int32", "(2, 3, 5)"):
    fn(jnp.zeros((2, 3, 5), jnp.int32), T)
  with _raises(TypeError, name, "teacher_logits", "floating"):
    fn(S, jnp.zeros((2, 3, 5), jnp.int32))
  with _raises(ValueError, name, "rank >= 1", "()"):
    fn(jnp.zeros(()), jnp.zeros(()))
  with _raises(ValueError, name, "where", "(2, 3)", "(2, 4)"):
    fn(S, T, where=jnp.ones((2, 4), bool))
  if name != "taid":
    with _raises(ValueError, name, "temperature", "> 0", "0.0"):
      fn(S, T, temperature=0.0)
    with _raises(ValueError, name, "temperature", "-1"):
      fn(S, T, temperature=-1)


def test_hyper_parameter_ranges():
  with _raises(ValueError, "generalized_jsd", "beta", "[0.0, 1.0]", "1.5"):
    losses.generalized_jsd(S, T, beta=1.5)
  with _raises(ValueError, "generalized_jsd", "beta", "-0.1"):
    losses.generalized_jsd(S, T, beta=-0.1)
  for name in ("skew_forward_kl", "skew_reverse_kl"):
    fn = getattr(losses, name)
    with _raises(ValueError, name, "alpha", "[0.0, 1.0)", "1.0"):
      fn(S, T, alpha=1.0)
    with _raises(ValueError, name, "alpha", "-0.5"):
      fn(S, T, alpha=-0.5)
  with _raises(ValueError, "taid", "t must lie in", "1.5"):
    losses.taid(S, T, t=1.5)
  with _raises(ValueError, "taid", "t must be a scalar", "(2,)"):
    losses.taid(S, T, t=jnp.array([0.1, 0.2]))
  # Traced hyper-parameters are not range-checked (and do not fail).
  jax.jit(lambda b: losses.generalized_jsd(S, T, beta=b))(0.5)
  jax.jit(lambda a: losses.skew_forward_kl(S, T, alpha=a))(0.5)
  jax.jit(lambda tau: losses.taid(S, T, t=tau))(0.5)


@pytest.mark.parametrize("name", ["dkd", "nkd"])
def test_label_errors(name):
  fn = getattr(losses, name)
  with _raises(TypeError, name, "labels", "integer", "float32", "(2, 3)"):
    fn(S, T, jnp.zeros((2, 3)))
  with _raises(ValueError, name, "labels", "shape (2, 3)", "(2,)"):
    fn(S, T, jnp.zeros((2,), jnp.int32))
  with _raises(ValueError, name, "labels", "[0, 5)", "[0, 5]"):
    fn(S, T, Y.at[0, 0].set(5))
  with _raises(ValueError, name, "labels", "[-1, 0]"):
    fn(S, T, Y.at[1, 2].set(-1))
  with _raises(ValueError, name, "at least 2 classes", "(2, 3, 1)"):
    fn(S[..., :1], T[..., :1], Y)
  # Out-of-range labels at masked positions (e.g. -100 "ignore") are fine.
  fn(S, T, Y.at[1, 2].set(-100), where=W.at[1, 2].set(False))
  # Traced labels cannot be range-checked and are accepted.
  jax.jit(lambda y: fn(S, T, y))(Y)


def test_sparse_kd_errors():
  name = "sparse_kd"
  with _raises(TypeError, name, "teacher_topk_indices", "integer", "float32"):
    losses.sparse_kd(S, TOPK_VALUES, TOPK_VALUES)
  with _raises(ValueError, name, "teacher_topk_indices shape (2, 3, 3)",
               "(2, 3, 2)"):
    losses.sparse_kd(S, TOPK_VALUES, jnp.zeros((2, 3, 3), jnp.int32))
  with _raises(ValueError, name, "(4, 3, 2)", "(2, 3, 5)"):
    losses.sparse_kd(S, jnp.zeros((4, 3, 2)), jnp.zeros((4, 3, 2), jnp.int32))
  with _raises(ValueError, name, "k=6", "V=5"):
    losses.sparse_kd(S, jnp.zeros((2, 3, 6)), jnp.zeros((2, 3, 6), jnp.int32))
  with _raises(ValueError, name, "teacher_topk_indices", "[0, 5)", "[0, 7]"):
    losses.sparse_kd(S, TOPK_VALUES, TOPK_INDICES.at[0, 0, 1].set(7))
  with _raises(TypeError, name, "student_logits", "floating"):
    losses.sparse_kd(Y[..., None], TOPK_VALUES, TOPK_INDICES)
  with _raises(ValueError, name, "temperature"):
    losses.sparse_kd(S, TOPK_VALUES, TOPK_INDICES, temperature=0.0)
  with _raises(ValueError, name, "where", "(2, 3)", "(3,)"):
    losses.sparse_kd(S, TOPK_VALUES, TOPK_INDICES, where=jnp.ones((3,)))


def test_multi_teacher_kd_errors():
  name = "multi_teacher_kd"
  teachers = jnp.zeros((3, 2, 3, 5))
  with _raises(ValueError, name, "[N_teachers", "(2, 3, 5)"):
    losses.multi_teacher_kd(S, T)
  with _raises(ValueError, name, "vocabulary/class sizes differ",
               "student V=5 teacher V=4"):
    losses.multi_teacher_kd(S, jnp.zeros((3, 2, 3, 4)))
  with _raises(ValueError, name, "weights", "3", "2 entries"):
    losses.multi_teacher_kd(S, teachers, weights=(0.5, 0.5))
  with _raises(ValueError, name, "temperatures", "one entry per teacher"):
    losses.multi_teacher_kd(S, teachers, temperatures=(1.0, 2.0))
  with _raises(ValueError, name, "temperatures", "> 0"):
    losses.multi_teacher_kd(S, teachers, temperatures=(1.0, 0.0, 2.0))
  with _raises(ValueError, name, "weights", "shape (3,)", "(2,)"):
    losses.multi_teacher_kd(S, teachers, weights=jnp.ones((2,)))
  with _raises(TypeError, name, "teacher_logits", "floating"):
    losses.multi_teacher_kd(S, jnp.zeros((3, 2, 3, 5), jnp.int32))
  with _raises(ValueError, name, "where", "(2, 3)", "(2,)"):
    losses.multi_teacher_kd(S, teachers, where=jnp.ones((2,), bool))


def test_standardize_logits_errors():
  name = "standardize_logits"
  with _raises(TypeError, name, "floating", "int32"):
    losses.standardize_logits(jnp.zeros((2, 3), jnp.int32))
  with _raises(ValueError, name, "rank >= 1"):
    losses.standardize_logits(jnp.zeros(()))
  with _raises(ValueError, name, "at least 2 classes", "(2, 1)"):
    losses.standardize_logits(jnp.zeros((2, 1)))


def test_errors_are_raised_at_trace_time_under_jit():
  with _raises(ValueError, "kd", "vocabulary/class sizes differ"):
    jax.jit(losses.kd)(S, T[..., :4])
  with _raises(ValueError, "dist", "where", "(2, 3)"):
    jax.jit(lambda s, t, w: losses.dist(s, t, where=w))(S, T, jnp.ones((6,)))
