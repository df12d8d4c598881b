"""CTKD's gradient reversal and curriculum; TAID's adaptive schedule in the method state."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from methods_helpers import build, np_log_softmax, random_batch, run

OPS = methods.single_device_ops()


# ---------------------------------------------------------------------------- CTKD


def test_ctkd_initial_temperature_is_official():
  method = build("ctkd")
  params, state = method.init(jax.random.PRNGKey(0), random_batch(0))
  assert state == {}
  assert params["temperature_logit"].shape == () and params["temperature_logit"] == 1.0
  _, metrics, _, _ = run(method, random_batch(0))
  np.testing.assert_allclose(float(metrics["temperature"]), 1 + 20 / (1 + math.exp(-1)),
                             rtol=1e-6)


def test_ctkd_lambda_follows_cosine_curriculum():
  method = build("ctkd", lambda_min=0.25, lambda_max=2.0, curriculum_steps=100)
  for step in (0, 1, 25, 50, 73, 100, 101, 10_000):
    progress = min(step, 100) / 100
    want = 0.25 + 1.75 * (1 - math.cos(math.pi * progress)) / 2
    _, metrics, _, _ = run(method, random_batch(0, step=step))
    np.testing.assert_allclose(float(metrics["ctkd_lambda"]), want, rtol=1e-6, atol=1e-7)
  assert float(method.grl_lambda(jnp.asarray(0))) == pytest.approx(0.25)
  assert float(method.grl_lambda(jnp.asarray(50))) == pytest.approx(1.125)


def test_ctkd_without_curriculum_uses_lambda_max_from_the_first_step():
  """curriculum_steps=0 (a derived value for a short run) means no curriculum, not 0/0."""
  method = build("ctkd", lambda_min=0.25, lambda_max=2.0, curriculum_steps=0)
  for step in (0, 7):
    _, metrics, _, _ = run(method, random_batch(0, step=step))
    assert float(metrics["ctkd_lambda"]) == 2.0


@pytest.mark.parametrize("step", [0, 300, 2000])
def test_ctkd_temperature_gradient_is_reversed(step):
  """d loss / d theta == -lambda(step) * (the plain KD gradient w.r.t. theta), while the
  student's gradient is the plain one: the temperature ascends the KD loss."""
  method = build("ctkd", curriculum_steps=1000)
  c = method.config
  batch = random_batch(1, (16, 10), step=step)
  params, state = method.init(jax.random.PRNGKey(0), batch)

  def plain(theta, logits):
    temperature = c.temperature_min + c.temperature_range * jax.nn.sigmoid(theta)
    kd = jnp.mean(losses.kd(logits, batch.teacher.logits, temperature=temperature))
    return c.kd_weight * kd  # CE does not depend on theta

  def ctkd(theta, logits):
    batch_z = methods.Batch(student=batch.student._replace(logits=logits),
                            teacher=batch.teacher, labels=batch.labels, where=batch.where,
                            step=batch.step)
    return method.loss({"temperature_logit": theta}, state, batch_z, OPS)[0]

  theta, logits = params["temperature_logit"], batch.student.logits
  plain_theta = float(jax.grad(plain)(theta, logits))
  ctkd_theta, ctkd_logits = jax.grad(ctkd, argnums=(0, 1))(theta, logits)
  lam = float(method.grl_lambda(jnp.asarray(step)))
  assert plain_theta != 0
  np.testing.assert_allclose(float(ctkd_theta), -lam * plain_theta, rtol=1e-5, atol=1e-12)
  if step > 0:
    assert np.sign(float(ctkd_theta)) == -np.sign(plain_theta)
  else:
    assert float(ctkd_theta) == 0.0  # lambda starts at 0: the temperature does not move
  # The student's gradient is untouched by the reversal (CE part added back).
  ce_grad = jax.grad(lambda z: c.ce_weight * jnp.mean(
      -jnp.take_along_axis(jax.nn.log_softmax(z), batch.labels[:, None], -1)))(logits)
  np.testing.assert_allclose(np.asarray(ctkd_logits),
                             np.asarray(jax.grad(plain, argnums=1)(theta, logits) + ce_grad),
                             rtol=1e-4, atol=1e-7)


def test_ctkd_sgd_step_raises_the_kd_loss():
  """One descent step on the combined loss moves theta so that KD gets larger."""
  method = build("ctkd", curriculum_steps=1)
  batch = random_batch(2, (32, 10), step=5)
  params, state = method.init(jax.random.PRNGKey(0), batch)
  grad = jax.grad(lambda p: method.loss(p, state, batch, OPS)[0])(params)
  stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad)
  kd_before = run(method, batch, params=params, state=state)[1]["kd"]
  kd_after = run(method, batch, params=stepped, state=state)[1]["kd"]
  assert float(kd_after) > float(kd_before)


# ---------------------------------------------------------------------------- TAID


def _np_taid_signal(s, teacher, t):
  """The official TAID loss value: mean over rows of -sum p_target log p_s."""
  s, teacher = np.asarray(s, np.float64), np.asarray(teacher, np.float64)
  log_target = np_log_softmax((1 - t) * s + t * teacher)
  return float(-(np.exp(log_target) * np_log_softmax(s)).sum(-1).mean())


def _sigmoid(x):
  return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("num_train_steps", [1000, 2])  # adaptive step wins / linear floor wins
def test_taid_state_update_matches_hand_computation(num_train_steps):
  t_start, t_end, alpha, beta = 0.4, 1.0, 0.1, 0.9
  method = build("taid", alpha=alpha, beta=beta, num_train_steps=num_train_steps)
  batch0, batch1 = random_batch(3, (8, 6), step=0), random_batch(4, (8, 6), step=1)
  _, state0 = method.init(jax.random.PRNGKey(0), batch0)
  assert float(state0["t"]) == pytest.approx(t_start) and np.isinf(state0["prev_loss"])

  _, metrics, state1, _ = run(method, batch0, state=state0)
  loss0 = _np_taid_signal(batch0.student.logits, batch0.teacher.logits, t_start)
  assert float(metrics["taid_t"]) == pytest.approx(t_start)
  np.testing.assert_allclose(float(state1["t"]), t_start, rtol=1e-7)  # first step: t kept
  np.testing.assert_allclose(float(state1["prev_loss"]), loss0, rtol=1e-5)
  assert float(state1["momentum"]) == 0.0

  _, metrics, state2, _ = run(method, batch1, state=state1)
  loss1 = _np_taid_signal(batch1.student.logits, batch1.teacher.logits, t_start)
  momentum = (1 - beta) * (loss0 - loss1) / (loss0 + 1e-15)
  delta = alpha * _sigmoid(momentum) * (1 - t_start)
  t_target = t_start + (t_end - t_start) * 1 / num_train_steps
  want_t = min(t_end, max(t_target, t_start + delta))
  assert float(metrics["taid_t"]) == pytest.approx(t_start)  # the loss used the old t
  np.testing.assert_allclose(float(state2["momentum"]), momentum, rtol=1e-4)
  np.testing.assert_allclose(float(state2["t"]), want_t, rtol=1e-6)
  np.testing.assert_allclose(float(state2["prev_loss"]), loss1, rtol=1e-5)
  if num_train_steps == 2:
    assert want_t == pytest.approx(0.7)


def test_taid_state_evolves_within_bounds_under_jit():
  t_start, t_end = 0.3, 0.8
  method = build("taid", t_start=t_start, t_end=t_end, alpha=0.05, num_train_steps=25)

  @jax.jit
  def loss_fn(state, student, teacher, labels, where, step):
    batch = methods.Batch(student=student, teacher=teacher, labels=labels, where=where,
                          step=step)
    return method.loss({}, state, batch, OPS)

  _, state = method.init(jax.random.PRNGKey(0), random_batch(0, (8, 6)))
  ts = []
  for step in range(30):
    b = random_batch(step, (8, 6), step=step)
    _, metrics, state = loss_fn(state, b.student, b.teacher, b.labels, b.where, b.step)
    ts.append(float(state["t"]))
    assert state["t"].dtype == jnp.float32 and state["t"].shape == ()
  ts = np.array(ts)
  assert (np.diff(ts) >= 0).all(), ts  # t never decreases
  assert ts.min() >= t_start and ts.max() <= t_end + 1e-7
  assert ts[5] > t_start and ts[-1] == pytest.approx(t_end)


def test_taid_without_adaptive_is_linear():
  method = build("taid", adaptive=False, num_train_steps=10)
  _, state = method.init(jax.random.PRNGKey(0), random_batch(0))
  for step in range(4):
    _, _, state, _ = run(method, random_batch(step, step=step), state=state)
  assert float(state["t"]) == pytest.approx(0.4 + 0.6 * 3 / 10)
