"""MEAL V2: KL to the teachers' averaged probabilities plus a discriminator on the logits,
against a float64 numpy reference; the student's share of the discriminator gradient is
reversed (or not, as the official code); padding rows change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.methods import Batch
from kdjax.models.output import Output
from methods_helpers import build

OPS = __import__("kdjax.methods", fromlist=["single_device_ops"]).single_device_ops()


def _batch(seed, b=6, c=10, teachers=3, where=None):
  rng = np.random.default_rng(seed)
  return Batch(student=Output(jnp.asarray(rng.normal(size=(b, c)) * 2, jnp.float32), {}),
               teacher=Output(jnp.asarray(rng.normal(size=(teachers, b, c)) * 3, jnp.float32),
                              {}),
               labels=jnp.asarray(rng.integers(0, c, b), jnp.int32),
               where=jnp.ones(b, bool) if where is None else jnp.asarray(where),
               step=jnp.int32(0))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(params, batch):
  s = np.asarray(batch.student.logits, np.float64)
  t = np.asarray(batch.teacher.logits, np.float64)
  p_t = np.exp(_log_softmax(t)).mean(0)
  kl = np.mean(np.sum(p_t * (np.log(p_t) - _log_softmax(s)), -1))

  def disc(x):
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
      p = params["discriminator"][layer]
      x = np.maximum(x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]), 0)
    return x

  bce = lambda z, y: np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
  fake, real = disc(s), disc(t.mean(0))
  d = np.mean(np.concatenate([bce(fake, np.array([1.0, 0.0])), bce(real, np.array([0.0, 1.0]))]))
  return kl, d


def test_loss_is_kl_to_the_averaged_teachers_plus_the_discriminator_loss():
  method = build("meal_v2")
  batch = _batch(0)
  # Jitted, as the train step runs them: op by op, init and loss took ~10 s to dispatch here.
  params, state = jax.jit(lambda: method.init(jax.random.PRNGKey(0), batch))()
  assert params["discriminator"]["Dense_0"]["kernel"].shape == (10, 16)  # Floored widths.
  loss, metrics, _ = jax.jit(lambda: method.loss(params, state, batch, OPS))()
  kl, d = _reference(params, batch)
  np.testing.assert_allclose(metrics["kd"], kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["discriminator"], d, rtol=1e-5)
  np.testing.assert_allclose(loss, kl + d, rtol=1e-5)
  # Padding rows (even NaN) change nothing: the loss equals the one on the kept rows.
  where = np.array([True, False, True, True, False, True])
  garbage = _batch(0, where=where)
  garbage = Batch(Output(garbage.student.logits.at[1].set(jnp.nan), {}), garbage.teacher,
                  garbage.labels, garbage.where, garbage.step)
  kept = Batch(Output(batch.student.logits[where], {}),
               Output(batch.teacher.logits[:, where], {}), batch.labels[where],
               jnp.ones(4, bool), batch.step)
  loss_of = lambda b: jax.jit(lambda: method.loss(params, state, b, OPS)[0])()
  np.testing.assert_allclose(loss_of(garbage), loss_of(kept), rtol=1e-5)


@pytest.mark.parametrize("reverse", [True, False])
def test_the_student_gets_the_discriminator_gradient_reversed_or_as_the_official_code(reverse):
  adversarial = build("meal_v2", kd_weight=0.0, reverse_gradient=reverse)
  batch = _batch(1)
  params, state = jax.jit(lambda: adversarial.init(jax.random.PRNGKey(2), batch))()  # As above.

  def loss_of(student_logits, method, p=params):
    b = Batch(Output(student_logits, {}), batch.teacher, batch.labels, batch.where, batch.step)
    return method.loss(p, state, b, OPS)[0]

  plain = build("meal_v2", kd_weight=0.0, reverse_gradient=False)
  g_reversed = jax.jit(jax.grad(lambda z: loss_of(z, adversarial)))(batch.student.logits)
  g_plain = jax.jit(jax.grad(lambda z: loss_of(z, plain)))(batch.student.logits)
  assert float(jnp.abs(g_plain).max()) > 0
  np.testing.assert_allclose(g_reversed, -g_plain if reverse else g_plain, rtol=1e-6)
  # The discriminator itself always descends its loss.
  g_disc = jax.jit(jax.grad(lambda p: loss_of(batch.student.logits, adversarial, p)))(params)
  g_disc_plain = jax.jit(jax.grad(lambda p: loss_of(batch.student.logits, plain, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_disc, g_disc_plain)


def test_bad_fields_name_the_field():
  with pytest.raises(ValueError, match=r"config.meal_v2.discriminator_reduction must be a "
                                       r"positive integer"):
    build("meal_v2", discriminator_reduction=0)
