"""Batches made on the device (`config.device_batches`) against the host pipeline's."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data
from kdjax.data import catalog, device_batches
from kdjax.train import parallel as parallel_lib


def _pipeline(data_dir, *, augment, batch_size=128, validation_examples=0):
  return data.InputPipeline("mnist1d", global_batch_size=batch_size, seed=3, data_dir=data_dir,
                            augment=augment, validation_examples=validation_examples)


def _device_batches(pipeline, **kwargs):
  return device_batches.DeviceBatches(pipeline, put=parallel_lib.JitParallel().put_replicated,
                                      num_steps=kwargs.pop("num_steps", 1000), **kwargs)


@pytest.mark.parametrize("validation_examples", [0, 500])
def test_same_examples_labels_and_inputs_as_the_host_pipeline(data_dir, validation_examples):
  # Batch 96 over 4000 (or 3500) examples: steps 40-42 cross an epoch boundary; windows of 5
  # steps: step 44 starts a new window.
  host = _pipeline(data_dir, augment=False, batch_size=96,
                   validation_examples=validation_examples)
  device = _device_batches(host, window_steps=5)
  make = jax.jit(device.make_batch)
  for step in (0, 1, 40, 41, 42, 44, 45, 200):
    expected = host.train_batch(step)
    got = jax.device_get(make(device.get(step)))
    np.testing.assert_array_equal(got["index"], expected["index"])
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_array_equal(got["inputs"], expected["inputs"])
    assert got["inputs"].dtype == np.float32 and got["labels"].dtype == np.int32


def test_augmented_batch_is_a_pure_function_of_seed_and_step(data_dir):
  host = _pipeline(data_dir, augment=True)
  small_windows, large_windows = _device_batches(host, window_steps=3), _device_batches(host)
  make = jax.jit(small_windows.make_batch)
  for step in (0, 7, 31):
    a = jax.device_get(make(small_windows.get(step)))
    b = jax.device_get(jax.jit(large_windows.make_batch)(large_windows.get(step)))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])  # Whatever the window.
    plain = host.train_batch(step)["inputs"]
    assert not np.allclose(a["inputs"], plain)  # Augmented ...
    np.testing.assert_array_equal(a["index"], host.train_batch(step)["index"])  # ... same rows.
  first, other = (jax.device_get(make(small_windows.get(s)))["inputs"] for s in (5, 6))
  assert not np.allclose(first[:10], other[:10])


def test_mnist1d_augmentation_is_a_clipped_shift_then_scale_and_noise():
  signals = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
  key = jax.random.key(1)
  # Without noise and scale, each row is one of the 9 edge-clipped shifts of its input.
  shifted = np.asarray(device_batches._mnist1d_device(  # pylint: disable=protected-access
      jnp.asarray(signals), key, scale_range=(1.0, 1.0), noise_std=0.0))
  candidates = [signals[:, np.clip(np.arange(-4, 36) + s, 0, 39)] for s in range(9)]
  matches = np.stack([np.all(shifted == c, axis=1) for c in candidates])
  assert matches.any(axis=0).all()
  assert len(set(matches.argmax(axis=0))) > 4  # Shifts differ between rows.
  # With scale and noise: the scale lies in [0.8, 1.2] and the noise has std ~0.05.
  full = np.asarray(device_batches._mnist1d_device(jnp.asarray(signals), key))  # pylint: disable=protected-access
  base = np.stack([candidates[matches[:, i].argmax()][i] for i in range(64)])
  scales = np.sum(full * base, axis=1) / np.sum(base * base, axis=1)
  assert np.all((scales > 0.75) & (scales < 1.25))
  residual = full - scales[:, None] * base
  assert 0.03 < residual.std() < 0.07


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_preprocessing_equals_the_host_one_and_augments_by_crop_and_flip(dataset):
  images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
  host = catalog.DATASETS[dataset].preprocess
  device = device_batches.DEVICE_PREPROCESS[dataset]
  np.testing.assert_allclose(np.asarray(device(jnp.asarray(images), None)), host(images, None),
                             rtol=0, atol=1e-6)
  augmented = np.asarray(device(jnp.asarray(images), jax.random.key(0)))
  # Each augmented image is some 4-pixel zero-padded crop of its input, maybe flipped.
  mean, std = {"cifar10": (catalog._CIFAR10_MEAN, catalog._CIFAR10_STD),  # pylint: disable=protected-access
               "cifar100": (catalog._CIFAR100_MEAN, catalog._CIFAR100_STD)}[dataset]  # pylint: disable=protected-access
  padded = np.pad(images.astype(np.float32) / 255.0, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = []
  for i in range(len(images)):
    found = None
    for top, left, flip in itertools.product(range(9), range(9), (False, True)):
      crop = padded[i, top:top + 32, left:left + 32]
      crop = crop[:, ::-1] if flip else crop
      if np.allclose((crop - mean) / std, augmented[i], atol=1e-5):
        found = flip
        break
    assert found is not None, f"image {i} is no crop/flip of its input"
    flips.append(found)
  assert 0 < sum(flips) < len(flips)


def test_unsupported_uses_are_refused_in_one_line():
  check = device_batches.check_supported
  with pytest.raises(device_batches.DeviceBatchesError, match=r"dataset 'pydoc' .*valid: "
                     r"cifar10, cifar100, mnist1d\); set config.device_batches=False\.$"):
    check(dataset="pydoc")
  with pytest.raises(device_batches.DeviceBatchesError, match="sampler 'class_pairs'"):
    check(dataset="mnist1d", sampler="class_pairs")
  with pytest.raises(device_batches.DeviceBatchesError, match="config.teacher.cache"):
    check(dataset="mnist1d", teacher_cache="/tmp/cache")
  with pytest.raises(device_batches.DeviceBatchesError, match="parallel 'pmap'"):
    check(dataset="mnist1d", parallel="pmap")
  check(dataset="cifar100")  # Supported: no error.
