"""Self-distillation targets and losses against float64 numpy (kdjax.losses.self_distillation)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import self_distillation as sd


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_onehot(labels, num_classes):
  return np.eye(num_classes)[np.asarray(labels)]


def test_soft_cross_entropy_matches_numpy_and_masks_like_slicing():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 5)) * 3
  q = np_softmax(rng.normal(size=(6, 5)))
  expected = -(q * np_log_softmax(z)).sum(-1)
  np.testing.assert_allclose(jax.jit(sd.soft_cross_entropy)(jnp.asarray(z, jnp.float32),
                                                            jnp.asarray(q, jnp.float32)),
                             expected, rtol=1e-5)
  where = np.array([1, 0, 1, 1, 0, 1], bool)
  garbage = z.copy()
  garbage[~where] = np.nan

  def total(logits):
    return jnp.sum(sd.soft_cross_entropy(logits, jnp.asarray(q, jnp.float32), where=where))

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(garbage, jnp.float32))
  np.testing.assert_allclose(value, expected[where].sum(), rtol=1e-5)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)


@pytest.mark.parametrize("num_steps,steps_per_epoch", [(40, 10), (100, 7)])
def test_ps_kd_alpha_is_the_official_epoch_schedule(num_steps, steps_per_epoch):
  alpha_T = 0.8
  steps = np.arange(0, num_steps + 15)
  # The official main.py: alpha_T * (epoch + 1) / end_epoch, epoch = step // steps_per_epoch.
  end_epoch = num_steps / steps_per_epoch
  expected = np.minimum(alpha_T * (steps // steps_per_epoch + 1) / end_epoch, alpha_T)
  got = jax.vmap(lambda s: sd.ps_kd_alpha(s, alpha_T=alpha_T, num_steps=num_steps,
                                          steps_per_epoch=steps_per_epoch))(steps)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] > 0 and got[-1] == pytest.approx(alpha_T)


def test_ps_kd_targets_for_a_known_history():
  rng = np.random.default_rng(1)
  labels = np.array([0, 3, 2, 3, 1])
  history = np_softmax(rng.normal(size=(5, 4)))
  seen = np.array([True, True, False, True, False])
  alpha = 0.35
  expected = np.where(seen[:, None], (1 - alpha) * np_onehot(labels, 4) + alpha * history,
                      np_onehot(labels, 4))
  got = jax.jit(lambda y, h, s: sd.ps_kd_targets(y, h, alpha=alpha, seen=s))(
      jnp.asarray(labels), jnp.asarray(history, jnp.float32), jnp.asarray(seen))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-6)


def test_virtual_teacher_is_the_official_softened_design():
  labels = np.array([2, 0, 4])
  for correct_prob, temperature in [(0.99, 20.0), (0.6, 3.0)]:
    # my_loss_function.loss_kd_regularization: u = (1-a)/(K-1), u[label] = a; softmax(u / T).
    u = np.full((3, 5), (1 - correct_prob) / 4)
    u[np.arange(3), labels] = correct_prob
    expected = np_softmax(u / temperature)
    z = np.random.default_rng(2).normal(size=(3, 5)) * 2
    got, kl_got = jax.jit(lambda x, y: (
        sd.virtual_teacher_probs(y, 5, correct_prob=correct_prob, temperature=temperature),
        sd.tf_kd_virtual(x, y, correct_prob=correct_prob, temperature=temperature)))(
            jnp.asarray(z, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    kl = (expected * (np.log(expected) - np_log_softmax(z))).sum(-1)
    np.testing.assert_allclose(kl_got, kl, rtol=1e-4, atol=1e-7)


def test_tf_kd_virtual_masks_like_slicing_with_garbage_rows():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([1, -100, 3, 0, -100], np.int32)
  where = labels >= 0
  z[~where] = np.inf

  def total(logits):
    return jnp.sum(sd.tf_kd_virtual(logits, labels, correct_prob=0.9, temperature=2.0,
                                    where=where))

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(z))
  sliced = jax.jit(lambda x, y: sd.tf_kd_virtual(x, y, correct_prob=0.9, temperature=2.0))(
      jnp.asarray(z[where]), labels[where])
  np.testing.assert_allclose(value, np.sum(sliced), rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)


def test_ema_momentum_cosine_matches_dino_scheduler_and_constant_is_constant():
  base_value, final_value, num_steps = 0.99, 1.0, 50
  steps = np.arange(0, 60)
  # DINO utils.cosine_scheduler: final + 0.5 * (base - final) * (1 + cos(pi * i / len)).
  expected = final_value + 0.5 * (base_value - final_value) * (
      1 + np.cos(np.pi * np.minimum(steps, num_steps) / num_steps))
  got = jax.vmap(lambda s: sd.ema_momentum(s, momentum=base_value, momentum_end=final_value,
                                           num_steps=num_steps))(steps)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] == pytest.approx(base_value) and got[-1] == pytest.approx(final_value)
  constant = jax.vmap(lambda s: sd.ema_momentum(s, momentum=0.9, schedule="constant"))(steps)
  np.testing.assert_allclose(constant, 0.9, rtol=1e-7)


def test_ema_update_matches_numpy_on_every_float_leaf():
  rng = np.random.default_rng(4)
  teacher = {"params": {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))},
             "batch_stats": {"mean": rng.normal(size=(2,))}, "count": np.array(3, np.int32)}
  student = jax.tree.map(lambda x: x + 1.5 if x.dtype != np.int32 else x + 4, teacher)
  momentum = 0.75
  as_jax = lambda tree: jax.tree.map(
      lambda x: jnp.asarray(x, jnp.int32 if x.dtype == np.int32 else jnp.float32), tree)
  new = jax.jit(sd.ema_update, static_argnums=2)(as_jax(teacher), as_jax(student), momentum)
  for path in (("params", "w"), ("params", "b"), ("batch_stats", "mean")):
    t, s, n = teacher[path[0]][path[1]], student[path[0]][path[1]], new[path[0]][path[1]]
    np.testing.assert_allclose(n, momentum * t + (1 - momentum) * s, rtol=1e-6)
    assert n.dtype == jnp.float32
  assert int(new["count"]) == 7


def test_argument_errors_name_the_function_and_value():
  with pytest.raises(ValueError, match=r"ema_momentum: schedule must be one of"):
    sd.ema_momentum(0, momentum=0.9, schedule="linear")
  with pytest.raises(ValueError, match=r"ps_kd_alpha: alpha_T must lie in \[0.0, 1.0\], got 1.5"):
    sd.ps_kd_alpha(0, alpha_T=1.5, num_steps=10, steps_per_epoch=2)
  with pytest.raises(ValueError, match=r"ps_kd_targets: seen must have shape \(2,\)"):
    sd.ps_kd_targets(jnp.array([0, 1]), jnp.ones((2, 3)) / 3, alpha=0.5,
                     seen=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match=r"ema_update: teacher and student pytrees differ"):
    sd.ema_update({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, 0.5)
  with pytest.raises(ValueError, match=r"virtual_teacher_probs: num_classes must be an int >= 2"):
    sd.virtual_teacher_probs(jnp.array([0]), 1)
  assert math.isfinite(float(sd.ps_kd_alpha(5, alpha_T=0.5, num_steps=3, steps_per_epoch=1)))
