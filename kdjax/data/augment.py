"""Numpy augmentations, seeded per batch so that a resumed run sees identical inputs."""

from typing import Optional, Tuple

import numpy as np


def _draw(rng, draw, rows: Optional[Tuple[int, int]], batch: int):
  """Draws random numbers for the whole global batch and keeps this process's rows, so the
  augmentation of an example does not depend on how the batch is split over processes."""
  if rows is None:
    return draw(batch)
  offset, total = rows
  return draw(total)[offset:offset + batch]


def random_crop_and_flip(images: np.ndarray, rng: np.random.Generator, *,
                         padding: int = 4, rows: Optional[Tuple[int, int]] = None
                         ) -> np.ndarray:
  """Random `padding`-pixel translation (zero padded) and horizontal flip.

  The standard CIFAR augmentation of RepDistiller / mdistiller (RandomCrop(32, padding=4),
  RandomHorizontalFlip).

  Args:
    images: [B, H, W, C] float images.
    rng: a numpy Generator, seeded by the caller from (seed, step).
    padding: maximum shift in pixels.
    rows: (offset, global batch size) when `images` are rows of a larger global batch.

  Returns:
    [B, H, W, C] augmented images.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  shifts = _draw(rng, lambda n: rng.integers(0, 2 * padding + 1, size=(n, 2)), rows, batch)
  flips = _draw(rng, lambda n: rng.random(n) < 0.5, rows, batch)
  tops, lefts = shifts[:, 0], shifts[:, 1]
  out = np.empty_like(images)
  for i in range(batch):
    crop = padded[i, tops[i]:tops[i] + height, lefts[i]:lefts[i] + width]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def random_shift_and_scale(signals: np.ndarray, rng: np.random.Generator, *,
                           max_shift: int = 4, scale_range=(0.8, 1.2),
                           noise_std: float = 0.05,
                           rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """1-D signal augmentation for MNIST-1D: shift by up to `max_shift` samples (edge padded),
  scale the amplitude and add white noise.

  Args:
    signals: [B, L] float signals.
    rng: a numpy Generator, seeded by the caller from (seed, step).
    rows: (offset, global batch size) when `signals` are rows of a larger global batch.

  Returns:
    [B, L] augmented signals.
  """
  batch, length = signals.shape
  padded = np.pad(signals, ((0, 0), (max_shift, max_shift)), mode="edge")
  starts = _draw(rng, lambda n: rng.integers(0, 2 * max_shift + 1, size=n), rows, batch)
  positions = starts[:, None] + np.arange(length)[None, :]
  shifted = np.take_along_axis(padded, positions, axis=1)
  scales = _draw(rng, lambda n: rng.uniform(*scale_range, size=(n, 1)), rows, batch)
  noise = _draw(rng, lambda n: rng.normal(0.0, noise_std, size=(n, length)), rows, batch)
  return (shifted * scales + noise).astype(np.float32)
