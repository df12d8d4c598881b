"""The U-Net denoiser's shapes, conditioning and registry; the digits classifier's contract;
a few teacher-training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from kdjax import validation
from kdjax.diffusion import classifier, digits, edm, unet


# A narrow U-Net with the digits net's structure (two levels, attention at 4x4): compiling the
# registered widths costs tens of seconds on a busy CPU for no extra coverage.
SMALL = dict(channels=8, blocks_per_level=1, num_heads=2, num_groups=4)


@pytest.mark.parametrize("name,shape", [("unet_digits", (2, 8, 8, 1)), ("unet_mnist", (2, 28, 28, 1)),
                                        ("unet_cifar", (2, 32, 32, 3))])
def test_registered_output_shapes(name, shape):
  net = unet.get_denoiser(name, num_classes=10)
  args = (jnp.zeros(shape), jnp.zeros(2), jnp.zeros(2, jnp.int32))
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), *args)  # shapes only, no compile
  assert jax.eval_shape(net.apply, variables, *args).shape == shape
  if name == "unet_digits":
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) <= 2_000_000


def test_class_and_noise_conditioning_and_null_label():
  net = unet.UNet(num_classes=10, **SMALL)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  noise = jnp.array([-1.0, 0.5])
  # jitter: random_variables leaves embedding tables at 0, which would hide the label.
  variables = random_variables(lambda: net.init(jax.random.PRNGKey(0), x, noise,
                                                jnp.zeros(2, jnp.int32)), jitter=0.1)
  apply = jax.jit(net.apply)
  out = apply(variables, x, noise, jnp.array([3, 3]))
  assert out.shape == x.shape and bool(jnp.isfinite(out).all())
  # The class label changes the output; None is the null label (row num_classes).
  assert float(jnp.abs(out - apply(variables, x, noise, jnp.array([7, 7]))).max()) > 1e-3
  np.testing.assert_allclose(jax.jit(lambda v, x, n: net.apply(v, x, n, None))(variables, x, noise),
                             apply(variables, x, noise, jnp.array([10, 10])), rtol=1e-6)
  # The noise label changes it too, per example.
  other = apply(variables, x, jnp.array([-1.0, 0.0]), jnp.array([3, 3]))
  np.testing.assert_allclose(other[0], out[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(other[1] - out[1]).max()) > 1e-3


def test_untrained_denoiser_is_c_skip_x():
  """conv_out starts at 0, so before training D(x, σ) = c_skip(σ) x exactly."""
  net = unet.UNet(num_classes=10, **SMALL)
  x = jnp.ones((1, 8, 8, 1))
  # An 'rbg' key: its initializers compile in well under half the time of threefry's here.
  key = jax.random.key(0, impl="rbg")
  variables = jax.jit(net.init)(key, x, jnp.zeros(1), jnp.zeros(1, jnp.int32))
  d = jax.jit(lambda v, x: edm.denoise(net.apply, v, x, 0.7, None, sigma_data=0.5))(variables, x)
  np.testing.assert_allclose(d, edm.c_skip(0.7, 0.5) * x, rtol=1e-6)


def test_unconditional_model_refuses_labels_and_unknown_names():
  net = unet.get_denoiser("unet_digits")
  x = jnp.ones((1, 8, 8, 1))
  with pytest.raises(ValueError, match="labels given to an unconditional model"):
    net.init(jax.random.PRNGKey(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32))
  with pytest.raises(validation.ConfigError, match="valid values: unet_cifar, unet_digits"):
    unet.get_denoiser("unet_digit")


def test_classifier_follows_the_model_contract():
  module = classifier.DigitsClassifier()
  images = jnp.zeros((3, 8, 8, 1))
  variables = module.init(jax.random.PRNGKey(0), images)
  output = module.apply(variables, images)
  assert output.logits.shape == (3, 10)
  assert output.features["embedding"].shape == (3, 64)
  features, predictions = classifier.embed(module, variables, np.zeros((3, 8, 8, 1)), batch_size=2)
  assert features.shape == (3, 64) and features.dtype == np.float64 and predictions.shape == (3,)


@pytest.mark.slow  # compiles a U-Net train step: ~30 s on a busy CPU.
def test_teacher_training_steps_lower_the_loss_and_move_the_ema():
  from kdjax.diffusion import train_teacher  # pylint: disable=g-import-not-at-top
  data = digits.load()
  config = train_teacher.TeacherConfig(channels=8, blocks_per_level=1, steps=40, batch_size=32, warmup_steps=5,
                                       learning_rate=3e-3, dropout=0.0)
  trained = train_teacher.train_teacher(config, data, log_every=0)
  losses = trained["losses"]
  assert np.isfinite(losses).all() and losses[-10:].mean() < losses[:10].mean()
  ema, params = jax.tree.leaves(trained["ema_params"]), jax.tree.leaves(trained["params"])
  assert any(not np.allclose(e, p) for e, p in zip(ema, params))
  assert float(train_teacher.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
  assert float(train_teacher.ema_decay_at(10 ** 6, 0.999)) == pytest.approx(0.999)
