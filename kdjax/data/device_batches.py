"""Training batches made inside the jitted step from a dataset held on the devices.

For a small step (the quickstart's MLP takes ~1 ms a batch on 2 CPU cores) the host's work per
step — gathering the batch, augmenting it in numpy, putting three arrays on the device — costs
a third of the step and competes with XLA for the same cores; no prefetch thread hides that.
With `config.device_batches = True` the training split is put on the devices once (MNIST-1D:
0.7 MB; CIFAR: 150 MB as uint8) and the train step computes batch `step` itself: the host only
passes the step number and, once every `window_steps` steps, the next window of the shuffled
example order. This is the usual fast path for small datasets in JAX training scripts.

What stays equal to the host pipeline (`InputPipeline.train_batch`): the examples of every
batch (the same grain-equal epoch shuffle, held-out validation examples excluded), their
labels and `index`, and the preprocessing (normalisation). What differs: the augmentation's
random draws come from `jax.random` keyed by (seed, step) instead of numpy's generator, so
the crops, flips, shifts and noise have the same distributions but other values. Batch `step`
is still a pure function of (seed, step), so a resumed run sees the batches an uninterrupted
run would.

Supported: datasets held in memory with a device preprocessing below (mnist1d, cifar10,
cifar100), the 'uniform' sampler, no teacher-output cache, the `jit` / `jit_2d*` strategies.
"""

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import augment
from kdjax.data import catalog

# The host's index window a step reads: at most this many int32 indices (16 MB) at a time.
_WINDOW_INDICES = 1 << 22


def _mnist1d_device(signals, key: Optional[jax.Array], *,
                    max_shift: int = augment.MNIST1D_MAX_SHIFT,
                    scale_range=augment.MNIST1D_SCALE_RANGE,
                    noise_std: float = augment.MNIST1D_NOISE_STD):
  """`augment.random_shift_and_scale` in jnp: [B, L] float32 signals."""
  signals = signals.astype(jnp.float32)
  if key is None:
    return signals
  batch, length = signals.shape
  k_shift, k_scale, k_noise = jax.random.split(key, 3)
  starts = jax.random.randint(k_shift, (batch,), 0, 2 * max_shift + 1)
  positions = jnp.clip(starts[:, None] + jnp.arange(-max_shift, length - max_shift), 0,
                       length - 1)
  shifted = jnp.take_along_axis(signals, positions, axis=1)
  scales = jax.random.uniform(k_scale, (batch, 1), minval=scale_range[0],
                              maxval=scale_range[1])
  noise = noise_std * jax.random.normal(k_noise, (batch, length))
  return shifted * scales + noise


def _cifar_device(mean: np.ndarray, std: np.ndarray,
                  padding: int = augment.CIFAR_CROP_PADDING):
  """`catalog._cifar_preprocess` in jnp: uint8 [B, 32, 32, 3] -> normalised float32, with
  `augment.random_crop_and_flip`'s RandomCrop(32, padding) + RandomHorizontalFlip when a key
  is given."""

  def preprocess(images, key: Optional[jax.Array]):
    images = images.astype(jnp.float32) / 255.0
    if key is not None:
      batch, height, width, _ = images.shape
      k_shift, k_flip = jax.random.split(key)
      shifts = jax.random.randint(k_shift, (batch, 2), 0, 2 * padding + 1)
      flips = jax.random.bernoulli(k_flip, 0.5, (batch,))
      padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
      crop = lambda image, top, left: jax.lax.dynamic_slice(
          image, (top, left, 0), (height, width, image.shape[-1]))
      images = jax.vmap(crop)(padded, shifts[:, 0], shifts[:, 1])
      images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return (images - mean) / std

  return preprocess


DEVICE_PREPROCESS: Dict[str, Callable] = {
    "mnist1d": _mnist1d_device,
    "cifar10": _cifar_device(catalog._CIFAR10_MEAN, catalog._CIFAR10_STD),  # pylint: disable=protected-access
    "cifar100": _cifar_device(catalog._CIFAR100_MEAN, catalog._CIFAR100_STD),  # pylint: disable=protected-access
}


class DeviceBatchesError(ValueError):
  """`config.device_batches` asked for where it cannot work."""


def check_supported(*, dataset: str, sampler: str = "uniform", teacher_cache: str = "",
                    parallel: str = "jit") -> None:
  """One-line errors, before anything is loaded, for what `device_batches` cannot serve."""
  why = None
  if dataset not in DEVICE_PREPROCESS:
    why = (f"dataset {dataset!r} has no device preprocessing (valid: "
           f"{', '.join(sorted(DEVICE_PREPROCESS))})")
  elif sampler != "uniform":
    why = f"sampler {sampler!r} builds its batches on the host (valid: 'uniform')"
  elif teacher_cache:
    why = "config.teacher.cache joins host-read teacher outputs to each batch"
  elif parallel == "pmap":
    why = "parallel 'pmap' takes per-device host batches (valid: jit, jit_2d, jit_2d_fsdp)"
  if why:
    raise DeviceBatchesError(f"config.device_batches=True: {why}; set "
                             "config.device_batches=False.")


class DeviceBatches:
  """Batch `step` of an `InputPipeline`, computed on the devices.

  `refs(step)` is what the host passes to the jitted step each step: the dataset arrays (put
  on the devices once), the current window of the shuffled example order and `step`;
  `make_batch(refs)` (traced inside the step) returns the global batch {'inputs' [B, ...]
  float32, 'labels' [B] int32, 'index' [B] int32}.
  """

  def __init__(self, pipeline, *, put: Callable, num_steps: int,
               window_steps: Optional[int] = None, steps_per_call: int = 1):
    """`pipeline`: a `kdjax.data.InputPipeline`; `put`: puts a host tree on the devices,
    replicated (the parallel strategy's `put_replicated`); `num_steps`: the run's length
    (windows never need more); `window_steps`: steps per index window (default: as many as
    4M indices hold, and at least `steps_per_call`, the most steps one call reads). Every
    window has the same shape, so the step compiles once."""
    spec = pipeline.spec
    name = next((n for n, s in catalog.DATASETS.items() if s is spec), spec.tfds_name)
    check_supported(dataset=name, sampler=pipeline.sampler,
                    teacher_cache="cache" if pipeline.teacher_cache is not None else "")
    arrays, _ = pipeline.split_arrays("train")
    if arrays is None:
      raise DeviceBatchesError(f"config.device_batches=True: dataset {name!r} is read record "
                               "by record, not held in memory; set config.device_batches=False.")
    self.pipeline, self.put = pipeline, put
    self.batch_size = pipeline.global_batch_size
    self.window_steps = max(1, steps_per_call,
                            min(window_steps or _WINDOW_INDICES // self.batch_size, num_steps))
    self._preprocess = DEVICE_PREPROCESS[name]
    self._data = put({"inputs": np.asarray(arrays[spec.input_key]),
                      "labels": np.asarray(arrays[spec.label_key], np.int32)})
    self._window = None  # (first step, device indices [window_steps * B]).

  def indices(self, first_step: int, num_steps: int) -> np.ndarray:
    """The example indices of batches first_step .. first_step + num_steps - 1, [n * B]."""
    return self.pipeline.train_indices(first_step * self.batch_size,
                                       num_steps * self.batch_size).astype(np.int32)

  def refs(self, step: int, num_steps: int = 1) -> dict:
    """The references of batch `step`; with `num_steps`, of batches step .. step +
    num_steps - 1 (one call of a step repeated `num_steps` times: its window holds them all)."""
    if num_steps > self.window_steps:
      raise ValueError(f"{num_steps} steps from one window of {self.window_steps} steps; "
                       f"build DeviceBatches with window_steps >= {num_steps}.")
    if self._window is None or not (
        self._window[0] <= step and step + num_steps <= self._window[0] + self.window_steps):
      self._window = (step, self.put(self.indices(step, self.window_steps)))
    return {"data": self._data, "window": self._window[1],
            "window_start": np.int32(self._window[0]), "step": np.int32(step)}

  get = refs  # The train loop's interface (as `Prefetcher.get`).

  def make_batch(self, refs: dict) -> dict:
    offset = (refs["step"] - refs["window_start"]) * self.batch_size
    indices = jax.lax.dynamic_slice(refs["window"], (offset,), (self.batch_size,))
    raw = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), refs["data"])
    key = None
    if self.pipeline.augment:
      key = jax.random.fold_in(jax.random.key(self.pipeline.seed), refs["step"])
    return {"inputs": self._preprocess(raw["inputs"], key),
            "labels": raw["labels"], "index": indices}
