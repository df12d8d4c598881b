"""Every new method: loss == its formula, finite gradients, padding contributes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from kdjax.methods import base
from methods_helpers import (build, np_cross_entropy, random_batch, run, select,
                             with_student_logits)


def _mean(values):
  return float(np.mean(np.asarray(values, np.float64)))


def _ctkd_temperature(config):
  return config.temperature_min + config.temperature_range * float(
      jax.nn.sigmoid(config.temperature_logit_init))


# name -> (config overrides that make every term count, expected(s, t, y, config) -> loss
# from kdjax.losses calls and numpy). s, t, y hold the selected rows only.
CASES = {
    "dist": ({"ce_weight": 0.5},
             lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + float(losses.dist(
                 s, t, beta=c.beta, gamma=c.gamma, temperature=c.temperature))),
    "kd_std": ({"ce_weight": 0.3},
               lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                   losses.kd(losses.standardize_logits(s), losses.standardize_logits(t),
                             temperature=c.temperature))),
    "nkd": ({"ce_weight": 0.7, "nkd_weight": 1.3},
            lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.nkd_weight * _mean(
                losses.nkd(s, t, y, temperature=c.temperature, gamma=c.gamma))),
    "ctkd": ({},
             lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                 losses.kd(s, t, temperature=_ctkd_temperature(c)))),
    "taid": ({"ce_weight": 0.2},
             lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.taid_weight * _mean(
                 losses.taid(s, t, t=c.t_start))),
    "fkl": ({"ce_weight": 0.3, "kd_weight": 0.7, "temperature": 2.0},
            lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                losses.forward_kl(s, t, temperature=c.temperature))),
    "rkl": ({"ce_weight": 0.3, "kd_weight": 0.7, "temperature": 2.0},
            lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                losses.reverse_kl(s, t, temperature=c.temperature))),
    "jsd": ({"ce_weight": 0.3, "beta": 0.3},
            lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                losses.generalized_jsd(s, t, beta=c.beta, temperature=c.temperature))),
    "skew_fkl": ({"ce_weight": 0.3, "alpha": 0.2},
                 lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                     losses.skew_forward_kl(s, t, alpha=c.alpha, temperature=c.temperature))),
    "skew_rkl": ({"ce_weight": 0.3, "alpha": 0.2},
                 lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                     losses.skew_reverse_kl(s, t, alpha=c.alpha, temperature=c.temperature))),
    "tvd": ({"ce_weight": 0.3, "temperature": 0.5},
            lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y) + c.kd_weight * _mean(
                losses.total_variation(s, t, temperature=c.temperature))),
    "multi_teacher_kd": ({"weights": (0.2, 0.5, 0.3), "temperatures": (1.0, 2.0, 4.0)},
                         lambda s, t, y, c: c.ce_weight * np_cross_entropy(s, y)
                         + c.kd_weight * _mean(losses.multi_teacher_kd(
                             s, t, weights=c.weights, temperatures=c.temperatures))),
}
NAMES = sorted(CASES)
SHAPES = [(8, 5), (3, 4, 7)]  # classifier [B, C]; sequence [B, T, V] with token masks


def _batch(name, seed, shape, **kw):
  num_teachers = 3 if name == "multi_teacher_kd" else None
  return random_batch(seed, shape, num_teachers=num_teachers, **kw)


def _padding(shape, seed):
  rng = np.random.default_rng(seed + 100)
  masked = rng.random(shape[:-1]) < 0.35
  masked.flat[0] = False  # at least one selected, at least one padding
  masked.flat[-1] = True
  return masked


def test_every_new_method_is_registered():
  assert set(NAMES) <= set(methods.METHODS)
  assert methods.METHODS["multi_teacher_kd"].teacher_needs.ensemble
  several = {name for name, cls in methods.METHODS.items() if cls.teacher_needs.ensemble}
  assert several == {"multi_teacher_kd", "meal_v2"}


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BTV"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_matches_formula(name, shape):
  overrides, expected = CASES[name]
  method = build(name, **overrides)
  batch = _batch(name, 0, shape, masked=_padding(shape, 0))
  loss, metrics, _, _ = run(method, batch)
  sel = select(batch)
  want = expected(np.asarray(sel.student.logits, np.float64),
                  np.asarray(sel.teacher.logits, np.float64),
                  np.asarray(sel.labels), method.config)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss))
  np.testing.assert_allclose(float(metrics["ce"]), np_cross_entropy(sel.student.logits,
                                                                    sel.labels), rtol=1e-5)
  assert all(jnp.ndim(v) == 0 for v in metrics.values()), metrics


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BTV"])
@pytest.mark.parametrize("name", NAMES)
def test_padding_contributes_nothing(name, shape):
  """Padding filled with NaN / inf logits and -100 labels: the same loss, metrics and new
  state as on the selected rows alone, and exactly zero, finite gradient on the padding."""
  method = build(name, **CASES[name][0])
  masked = _padding(shape, 1)
  batch = _batch(name, 1, shape, masked=masked, garbage=True)
  loss, metrics, state, params = run(method, batch)
  loss_sel, metrics_sel, state_sel, _ = run(method, select(batch))
  np.testing.assert_allclose(float(loss), float(loss_sel), rtol=1e-5, atol=1e-7)
  for key in metrics:
    np.testing.assert_allclose(float(metrics[key]), float(metrics_sel[key]), rtol=1e-5,
                               atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state, state_sel)

  def loss_of_logits(logits):
    return method.loss(params, method.init(jax.random.PRNGKey(0), batch)[1],
                       with_student_logits(batch, logits), methods.single_device_ops())[0]

  grad = np.asarray(jax.grad(loss_of_logits)(batch.student.logits))
  assert np.isfinite(grad).all()
  assert (grad[masked] == 0).all()
  assert np.abs(grad[~masked]).sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_under_jit(name):
  method = build(name)
  batch = _batch(name, 2, (16, 10))
  params, state = method.init(jax.random.PRNGKey(0), batch)

  @jax.jit
  def grads(params, logits):
    return jax.grad(lambda p, z: method.loss(p, state, with_student_logits(batch, z),
                                             methods.single_device_ops())[0],
                    argnums=(0, 1))(params, logits)

  param_grads, logit_grads = grads(params, batch.student.logits)
  assert np.isfinite(np.asarray(logit_grads)).all()
  assert np.abs(np.asarray(logit_grads)).sum() > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(param_grads))


def test_cross_entropy_and_accuracy_on_sequences():
  batch = random_batch(3, (2, 5, 6), masked=_padding((2, 5, 6), 3), garbage=True)
  ops = methods.single_device_ops()
  sel = select(batch)
  np.testing.assert_allclose(float(base.cross_entropy(batch, ops)),
                             np_cross_entropy(sel.student.logits, sel.labels), rtol=1e-5)
  correct = np.argmax(np.asarray(sel.student.logits), -1) == np.asarray(sel.labels)
  np.testing.assert_allclose(float(base.accuracy(batch, ops)), correct.mean(), rtol=1e-6)
