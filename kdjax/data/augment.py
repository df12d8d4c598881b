"""Numpy augmentations, seeded per batch so that a resumed run sees identical inputs."""

import numpy as np


def random_crop_and_flip(images: np.ndarray, rng: np.random.Generator, *,
                         padding: int = 4) -> np.ndarray:
  """Random `padding`-pixel translation (zero padded) and horizontal flip.

  The standard CIFAR augmentation of RepDistiller / mdistiller (RandomCrop(32, padding=4),
  RandomHorizontalFlip).

  Args:
    images: [B, H, W, C] float images.
    rng: a numpy Generator, seeded by the caller from (seed, step).
    padding: maximum shift in pixels.

  Returns:
    [B, H, W, C] augmented images.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  tops = rng.integers(0, 2 * padding + 1, size=batch)
  lefts = rng.integers(0, 2 * padding + 1, size=batch)
  flips = rng.random(batch) < 0.5
  out = np.empty_like(images)
  for i in range(batch):
    crop = padded[i, tops[i]:tops[i] + height, lefts[i]:lefts[i] + width]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def random_shift_and_scale(signals: np.ndarray, rng: np.random.Generator, *,
                           max_shift: int = 4, scale_range=(0.8, 1.2),
                           noise_std: float = 0.05) -> np.ndarray:
  """1-D signal augmentation for MNIST-1D: shift by up to `max_shift` samples (edge padded),
  scale the amplitude and add white noise.

  Args:
    signals: [B, L] float signals.
    rng: a numpy Generator, seeded by the caller from (seed, step).

  Returns:
    [B, L] augmented signals.
  """
  batch, length = signals.shape
  padded = np.pad(signals, ((0, 0), (max_shift, max_shift)), mode="edge")
  starts = rng.integers(0, 2 * max_shift + 1, size=batch)
  positions = starts[:, None] + np.arange(length)[None, :]
  shifted = np.take_along_axis(padded, positions, axis=1)
  scales = rng.uniform(*scale_range, size=(batch, 1))
  noise = rng.normal(0.0, noise_std, size=signals.shape)
  return (shifted * scales + noise).astype(np.float32)
