"""The datasets kdjax knows by name, and how to turn their records into model inputs."""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from kdjax.data import augment
from kdjax.data.text_catalog import TEXT_DATASETS, TextDatasetSpec

# CIFAR channel statistics used by RepDistiller / mdistiller.
_CIFAR100_MEAN = np.array([0.5071, 0.4867, 0.4408], np.float32)
_CIFAR100_STD = np.array([0.2675, 0.2565, 0.2761], np.float32)
_CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
_CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one TFDS dataset.

  Attributes:
    tfds_name: the TFDS name (`tfds.data_source(tfds_name)`).
    input_key / label_key: record fields holding the input and the integer label.
    num_classes: number of label classes.
    input_shape: shape of one preprocessed input, without the batch axis.
    input_kind: 'signal1d', 'image32' or 'image224'; models declare the kind they take.
    variable_input_size: records hold inputs of different sizes (ImageNet's JPEGs): they are
      read record by record and `preprocess` receives a list of arrays.
    train_split / eval_split: TFDS split names.
    train_examples: the training split's size where it is known before reading (checks of
      per-example method memories before a run); the pipeline counts it in any case.
    local_builder: a `GeneratorBasedBuilder` class that generates the data offline, or None
      for datasets that must be prepared by `tfds build` beforehand.
    preprocess: `(inputs [b, ...] raw, rng or None, rows) -> float32 inputs`; augments the
      training batches with `rng`; `rng` is None at evaluation (and when augmentation is off).
      `rows` = (offset, global batch size) places the b rows within the global batch.
    in_memory_splits: for datasets registered from numpy arrays, each split's in-memory
      random-access source (`sources.ArraySource`); None for TFDS datasets.
  """
  tfds_name: str
  input_key: str
  label_key: str
  num_classes: int
  input_shape: tuple
  input_kind: str = "image32"
  train_split: str = "train"
  eval_split: str = "test"
  train_examples: Optional[int] = None
  variable_input_size: bool = False
  local_builder: Optional[Callable] = None
  preprocess: Callable = lambda inputs, rng, rows=None: np.asarray(inputs, np.float32)
  # Split name -> random-access source held in memory (`kdjax.data.register_arrays`); such a
  # dataset is never read from TFDS. Left out of comparisons: it holds the arrays.
  in_memory_splits: Optional[Mapping[str, Any]] = dataclasses.field(
      default=None, compare=False, repr=False)


def _mnist1d_builder():
  from kdjax.data.mnist1d_tfds import Mnist1d
  return Mnist1d


def _mnist1d_preprocess(signals, rng, rows=None):
  signals = np.asarray(signals, np.float32)
  return signals if rng is None else augment.random_shift_and_scale(signals, rng, rows=rows)


def _digits_builder():
  from kdjax.data.digits_tfds import SklearnDigits
  return SklearnDigits


def _diffusion_preprocess(scale):
  """Pixels to [−1, 1] (`scale`: the raw maximum / 2; 1.0 for records already scaled), no
  augmentation: diffusion models learn the data distribution as it is."""
  def preprocess(images, rng, rows=None):
    del rng, rows
    images = np.asarray(images, np.float32)
    return images if scale == 1.0 else images / scale - 1.0
  return preprocess


def _cifar_preprocess(mean, std):
  def preprocess(images, rng, rows=None):
    images = np.asarray(images, np.float32) / 255.0
    if rng is not None:
      images = augment.random_crop_and_flip(images, rng, rows=rows)
    return (images - mean) / std
  return preprocess


# ImageNet channel statistics (torchvision), on [0, 1] pixels.
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def imagenet_preprocess(images, rng, rows=None):
  """Training: inception crop 224 + flip; evaluation (`rng` None): resize 256, centre 224."""
  if rng is not None:
    crops = augment.inception_crop_and_flip(images, rng, size=224, rows=rows)
  else:
    crops = augment.resize_and_center_crop(images, size=224, resize=256)
  return (crops.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD


DATASETS = {
    "mnist1d": DatasetSpec(
        tfds_name="mnist1d", input_key="signal", label_key="label", num_classes=10,
        input_shape=(40,), input_kind="signal1d", train_examples=4000,
        local_builder=_mnist1d_builder,
        preprocess=_mnist1d_preprocess),
    # Diffusion data (kdjax/diffusion): images in [−1, 1]; digits generated offline from
    # scikit-learn, mnist from a TFDS preparation (`tfds build mnist --file_format=array_record`).
    "digits": DatasetSpec(
        tfds_name="sklearn_digits", input_key="image", label_key="label", num_classes=10,
        input_shape=(8, 8, 1), input_kind="image8", train_examples=1497,
        local_builder=_digits_builder, preprocess=_diffusion_preprocess(1.0)),
    "mnist": DatasetSpec(
        tfds_name="mnist", input_key="image", label_key="label", num_classes=10,
        input_shape=(28, 28, 1), input_kind="image28", train_examples=60000,
        preprocess=_diffusion_preprocess(127.5)),
    "cifar100": DatasetSpec(
        tfds_name="cifar100", input_key="image", label_key="label", num_classes=100,
        input_shape=(32, 32, 3), train_examples=50000,
        preprocess=_cifar_preprocess(_CIFAR100_MEAN, _CIFAR100_STD)),
    "cifar10": DatasetSpec(
        tfds_name="cifar10", input_key="image", label_key="label", num_classes=10,
        input_shape=(32, 32, 3), train_examples=50000,
        preprocess=_cifar_preprocess(_CIFAR10_MEAN, _CIFAR10_STD)),
    # Prepared by hand once: `tfds build imagenet2012 --manual_dir=... --file_format=array_record`.
    "imagenet2012": DatasetSpec(
        tfds_name="imagenet2012", input_key="image", label_key="label", num_classes=1000,
        input_shape=(224, 224, 3), input_kind="image224", eval_split="validation",
        train_examples=1_281_167, variable_input_size=True, preprocess=imagenet_preprocess),
}


def get_dataset_spec(name: str) -> Union[DatasetSpec, TextDatasetSpec]:
  """The DatasetSpec of an image/signal dataset or the TextDatasetSpec of a text dataset."""
  if name in DATASETS:
    return DATASETS[name]
  if name in TEXT_DATASETS:
    return TEXT_DATASETS[name]
  raise ValueError(f"Unknown dataset {name!r}; valid datasets: "
                   f"{', '.join(sorted(DATASETS))}; text datasets: "
                   f"{', '.join(sorted(TEXT_DATASETS))}.")


# The datasets shipped with kdjax: `register` never replaces these.
BUILT_IN = frozenset(DATASETS)


def register(name: str, spec: DatasetSpec, *, replace: bool = False) -> None:
  """Makes a dataset of your own available by name to configs (`config.dataset`).

  `spec` says how to read it: a TFDS dataset prepared in array_record format in
  `config.data_dir` (`tfds_name`, keys, `num_classes`, `input_shape`, `input_kind`,
  `preprocess`), or in-memory arrays (`kdjax.data.register_arrays` builds that spec). Like a
  model registration, it must run in the training process before `train_and_evaluate` /
  `run_suite`.

  Raises:
    ValueError: the name is taken (pass `replace=True` to replace an earlier registration;
      built-in datasets are never replaced) or `spec` is not a `DatasetSpec`.
  """
  if not isinstance(name, str) or not name or any(c in name for c in ",:/ "):
    raise ValueError(f"register: dataset name must be a non-empty string without ',', ':', '/' "
                     f"or spaces; got {name!r}.")
  if not isinstance(spec, DatasetSpec):
    raise ValueError(f"register: spec of dataset {name!r} must be a kdjax.data.DatasetSpec; got "
                     f"{type(spec).__name__}.")
  if name in BUILT_IN or name in TEXT_DATASETS:
    raise ValueError(f"register: {name!r} is a built-in dataset and cannot be replaced; choose "
                     "another name.")
  if name in DATASETS and not replace:
    raise ValueError(f"register: dataset {name!r} is already registered; pass replace=True to "
                     "replace it.")
  DATASETS[name] = spec


def unregister(name: str) -> None:
  """Removes a registered dataset (tests, notebooks re-run cell by cell)."""
  if name in BUILT_IN:
    raise ValueError(f"unregister: {name!r} is a built-in dataset.")
  DATASETS.pop(name, None)
