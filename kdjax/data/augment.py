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
