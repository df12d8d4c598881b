"""Numpy augmentations, seeded per batch so that a resumed run sees identical inputs."""

from typing import Optional, Tuple

import numpy as np

# The standard augmentations' parameters, one definition for the host (numpy, here) and the
# device (`kdjax.data.device_batches`) versions.
CIFAR_CROP_PADDING = 4  # RandomCrop(32, padding=4) of RepDistiller / mdistiller.
MNIST1D_MAX_SHIFT = 4
MNIST1D_SCALE_RANGE = (0.8, 1.2)
MNIST1D_NOISE_STD = 0.05


def _draw(rng, draw, rows: Optional[Tuple[int, int]], batch: int):
  """Draws random numbers for the whole global batch and keeps this process's rows, so the
  augmentation of an example does not depend on how the batch is split over processes."""
  if rows is None:
    return draw(batch)
  offset, total = rows
  return draw(total)[offset:offset + batch]


def random_crop_and_flip(images: np.ndarray, rng: np.random.Generator, *,
                         padding: int = CIFAR_CROP_PADDING,
                         rows: Optional[Tuple[int, int]] = None
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
                           max_shift: int = MNIST1D_MAX_SHIFT,
                           scale_range=MNIST1D_SCALE_RANGE,
                           noise_std: float = MNIST1D_NOISE_STD,
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
  starts = _draw(rng, lambda n: rng.integers(0, 2 * max_shift + 1, size=n), rows, batch)
  # Edge padding by `max_shift` then a window from `start` is a clipped gather (no padded copy).
  positions = np.clip(starts[:, None] + np.arange(-max_shift, length - max_shift), 0,
                      length - 1)
  shifted = signals[np.arange(batch)[:, None], positions]
  scales = _draw(rng, lambda n: rng.uniform(*scale_range, size=(n, 1)), rows, batch)
  noise = _draw(rng, lambda n: rng.normal(0.0, noise_std, size=(n, length)), rows, batch)
  return (shifted * scales + noise).astype(np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of one uint8 [H, W, C] image (PIL, as torchvision's default)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(
      (width, height), Image.BILINEAR))


_CROP_ATTEMPTS = 10


def inception_crop_and_flip(images, rng: np.random.Generator, *, size: int = 224,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """The ImageNet training augmentation (torchvision `RandomResizedCrop(size)` +
  `RandomHorizontalFlip`, Szegedy et al. 2015's "inception crop").

  A crop covering `scale` of the image area with aspect ratio in `ratio` (log-uniform) is
  tried up to 10 times; if none fits, the centre crop of the largest allowed aspect ratio is
  used. The crop is resized to `size` x `size` (bilinear) and flipped with probability 1/2.
  Random numbers are drawn for the whole global batch (a fixed number per example), so an
  example's crop does not depend on how the batch is split over processes.

  Args:
    images: a sequence of b uint8 [H_i, W_i, C] images (sizes may differ).
    rng: a numpy Generator, seeded by the caller from (seed, step).
    rows: (offset, global batch size) when `images` are rows of a larger global batch.

  Returns:
    [b, size, size, C] uint8 crops.
  """
  batch = len(images)
  draws = _draw(rng, lambda n: rng.random((n, _CROP_ATTEMPTS, 4)), rows, batch)
  flips = _draw(rng, lambda n: rng.random(n) < 0.5, rows, batch)
  log_ratio = np.log(ratio)
  out = []
  for image, attempts, flip in zip(images, draws, flips):
    height, width = image.shape[:2]
    area = height * width
    box = None
    for u_scale, u_ratio, u_top, u_left in attempts:
      target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
      aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
      w = int(round(np.sqrt(target_area * aspect)))
      h = int(round(np.sqrt(target_area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top = int(u_top * (height - h + 1))
        left = int(u_left * (width - w + 1))
        box = (top, left, h, w)
        break
    if box is None:  # Fallback: the whole image, cropped to the allowed aspect ratios.
      aspect = width / height
      if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
      elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
      else:
        w, h = width, height
      box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    crop = _resize(image[top:top + h, left:left + w], size, size)
    out.append(crop[:, ::-1] if flip else crop)
  return np.stack(out)


def resize_and_center_crop(images, *, size: int = 224, resize: int = 256) -> np.ndarray:
  """The ImageNet evaluation transform (torchvision `Resize(resize)` + `CenterCrop(size)`):
  the shorter side resized to `resize` (bilinear), then the central `size` x `size`.

  Args:
    images: a sequence of b uint8 [H_i, W_i, C] images.

  Returns:
    [b, size, size, C] uint8.
  """
  out = []
  for image in images:
    height, width = image.shape[:2]
    if height <= width:
      new_h, new_w = resize, int(resize * width / height)
    else:
      new_h, new_w = int(resize * height / width), resize
    resized = _resize(image, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    out.append(resized[top:top + size, left:left + size])
  return np.stack(out)
