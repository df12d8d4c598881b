"""DINO's centring and sharpening, multi-view cross-entropy and centre update against
hand-written float64 numpy versions of the official `DINOLoss`; masks equal slicing."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import dino as dino_losses


def np_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_dino_loss(student, teacher, center, teacher_temperature, student_temperature):
  """DINOLoss.forward: the teacher's views (centred, sharpened) against every other student
  view, averaged over pairs, per example."""
  targets = np_softmax((np.asarray(teacher, np.float64) - center) / teacher_temperature)
  total, pairs = 0.0, 0
  for iq in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if v == iq:
        continue
      log_p = np.log(np_softmax(np.asarray(student[v], np.float64) / student_temperature))
      total = total + np.sum(-targets[iq] * log_p, axis=-1)
      pairs += 1
  return total / pairs


def test_center_and_sharpen_matches_numpy_in_float64():
  rng = np.random.default_rng(0)
  t, c = rng.normal(size=(2, 5, 7)), rng.normal(size=7)
  with jax.enable_x64(True):
    got = dino_losses.dino_center_and_sharpen(jnp.asarray(t), jnp.asarray(c), temperature=0.04)
    np.testing.assert_allclose(got, np_softmax((t - c) / 0.04), rtol=1e-12)
    # Sharper than the plain softmax: lower entropy at a lower temperature.
    entropy = lambda p: -np.sum(p * np.log(p + 1e-300), -1)
    assert np.all(entropy(np.asarray(got)) < entropy(np_softmax(t - c)))


def test_cross_entropy_excludes_same_view_pairs_as_the_official_loss():
  rng = np.random.default_rng(1)
  student, teacher, c = rng.normal(size=(5, 6, 8)), rng.normal(size=(2, 6, 8)), rng.normal(size=8)
  with jax.enable_x64(True):
    targets, got = jax.jit(lambda s, t, c: (
        dino_losses.dino_center_and_sharpen(t, c, temperature=0.07),
        dino_losses.dino_cross_entropy(s, dino_losses.dino_center_and_sharpen(
            t, c, temperature=0.07), temperature=0.1)))(student, teacher, c)
    np.testing.assert_allclose(got, np_dino_loss(student, teacher, c, 0.07, 0.1), rtol=1e-12)
    # Same-view pairs are excluded: changing student view 0 changes only pairs with teacher 1.
    same = np.zeros_like(student)
    same[0] = teacher[0] * 100  # Student view 0 alone.
    only_first = dino_losses.dino_cross_entropy(jnp.asarray(same[:2]), targets[:1])
    uniform = np.full(6, np.log(8.0))  # Teacher 0 only meets student view 1 (all zeros).
    np.testing.assert_allclose(only_first, uniform, rtol=1e-12)


def test_cross_entropy_mask_equals_slicing_and_gives_zero_gradient_to_padding():
  rng = np.random.default_rng(2)
  student = rng.normal(size=(4, 6, 5)).astype(np.float32)
  targets = np_softmax(rng.normal(size=(2, 6, 5))).astype(np.float32)
  where = np.array([True, False, True, True, False, True])
  bad = student.copy()
  bad[:, ~where] = np.nan
  masked_loss = lambda s: dino_losses.dino_cross_entropy(s, targets, where=where)
  got, grad, sliced = jax.jit(lambda s: (
      masked_loss(s), jax.grad(lambda x: jnp.sum(masked_loss(x)))(s),
      dino_losses.dino_cross_entropy(student[:, where], targets[:, where])))(bad)
  np.testing.assert_allclose(np.asarray(got)[where], sliced, rtol=1e-6)
  assert np.all(np.asarray(got)[~where] == 0)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, ~where] == 0)


def test_center_update_is_the_ema_of_the_masked_batch_mean():
  rng = np.random.default_rng(3)
  t, c = rng.normal(size=(2, 6, 4)), rng.normal(size=4)
  where = np.array([True, True, False, True, False, True])
  bad = t.copy()
  bad[:, ~where] = np.inf
  with jax.enable_x64(True):
    got = dino_losses.dino_update_center(jnp.asarray(c), jnp.asarray(bad), momentum=0.9,
                                         where=jnp.asarray(where))
    expected = 0.9 * c + 0.1 * t[:, where].reshape(-1, 4).mean(0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    unmasked = dino_losses.dino_update_center(jnp.asarray(c), jnp.asarray(t[0]), momentum=0.0)
    np.testing.assert_allclose(unmasked, t[0].mean(0), rtol=1e-12)


def test_bad_arguments_fail_with_messages_naming_them():
  with pytest.raises(ValueError, match=r"dino_center_and_sharpen: center must have shape \(3,\)"):
    dino_losses.dino_center_and_sharpen(jnp.ones((2, 3)), jnp.ones(4))
  with pytest.raises(ValueError, match="dino_cross_entropy: teacher_probs shape"):
    dino_losses.dino_cross_entropy(jnp.ones((2, 4, 3)), jnp.ones((3, 4, 3)))
  with pytest.raises(ValueError, match="dino_cross_entropy: temperature must be > 0"):
    dino_losses.dino_cross_entropy(jnp.ones((2, 4, 3)), jnp.ones((1, 4, 3)), temperature=0.0)
  with pytest.raises(ValueError, match=r"dino_update_center: momentum must lie in \[0.0, 1.0\]"):
    dino_losses.dino_update_center(jnp.ones(3), jnp.ones((4, 3)), momentum=1.5)
