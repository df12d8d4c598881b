"""The augmentations equal plain per-example references bit for bit, so making them faster
never changes a batch (the MNIST-1D shift is now one clipped gather instead of a padded copy)."""

import numpy as np
import pytest

from kdjax.data import augment


def _crop_and_flip_loop(images, rng, padding=4, rows=None):
  """The former implementation: one slice per example (same random draws, same order)."""
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  total = batch if rows is None else rows[1]
  offset = 0 if rows is None else rows[0]
  shifts = rng.integers(0, 2 * padding + 1, size=(total, 2))[offset:offset + batch]
  flips = (rng.random(total) < 0.5)[offset:offset + batch]
  out = np.empty_like(images)
  for i in range(batch):
    crop = padded[i, shifts[i, 0]:shifts[i, 0] + height, shifts[i, 1]:shifts[i, 1] + width]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def _shift_and_scale_loop(signals, rng, max_shift=4, rows=None):
  """The former implementation: an edge-padded copy, then a window per example."""
  batch, length = signals.shape
  total = batch if rows is None else rows[1]
  offset = 0 if rows is None else rows[0]
  padded = np.pad(signals, ((0, 0), (max_shift, max_shift)), mode="edge")
  starts = rng.integers(0, 2 * max_shift + 1, size=total)[offset:offset + batch]
  shifted = np.stack([padded[i, s:s + length] for i, s in enumerate(starts)])
  scales = rng.uniform(0.8, 1.2, size=(total, 1))[offset:offset + batch]
  noise = rng.normal(0.0, 0.05, size=(total, length))[offset:offset + batch]
  return (shifted * scales + noise).astype(np.float32)


@pytest.mark.parametrize("shape, padding, rows", [
    ((16, 32, 32, 3), 4, None), ((5, 7, 9, 1), 2, None), ((4, 8, 8, 3), 4, (4, 12))])
def test_crop_and_flip_equals_the_per_example_loop(shape, padding, rows):
  images = np.random.default_rng(0).random(shape, np.float32)
  got = augment.random_crop_and_flip(images, np.random.default_rng(3), padding=padding,
                                     rows=rows)
  want = _crop_and_flip_loop(images, np.random.default_rng(3), padding, rows)
  assert got.shape == images.shape and got.dtype == images.dtype
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, images)


@pytest.mark.parametrize("shape, max_shift, rows", [
    ((128, 40), 4, None), ((3, 5), 7, None), ((8, 40), 4, (8, 24))])
def test_shift_and_scale_equals_the_padded_windows(shape, max_shift, rows):
  signals = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  got = augment.random_shift_and_scale(signals, np.random.default_rng(5), max_shift=max_shift,
                                       rows=rows)
  want = _shift_and_scale_loop(signals, np.random.default_rng(5), max_shift, rows)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
