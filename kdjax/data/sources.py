"""Random-access data sources: TFDS (array_record, read without TensorFlow) or in memory.

Every TFDS dataset, the offline MNIST-1D included, goes through `tfds.data_source`; datasets
with a local builder are generated into `data_dir` on first use. Datasets registered from numpy
arrays (`register_arrays`) are `ArraySource`s with the same random-access interface, so the
input pipeline reads both the same way.
"""

import contextlib
import io
import logging
import os
import sys
import time
from typing import Callable, Optional, Tuple

import numpy as np

from kdjax import paths
from kdjax.data import catalog
from kdjax.data.catalog import DatasetSpec


def default_data_dir() -> str:
  """$KDJAX_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (as TFDS itself)."""
  return paths.resolve(os.environ.get("KDJAX_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
                       or "~/tensorflow_datasets")


class DatasetNotPreparedError(RuntimeError):
  pass


def _not_prepared_message(spec: DatasetSpec, data_dir: str) -> str:
  return (
      f"Dataset {spec.tfds_name!r} is not prepared in data_dir={data_dir!r} and this machine "
      "cannot download it. Prepare it offline: on a machine with internet run "
      f"`tfds build {spec.tfds_name} --data_dir=DIR --file_format=array_record` (or place the "
      "original archives in DIR/downloads/manual and run the same command), then copy "
      f"DIR/{spec.tfds_name} into {data_dir!r} or pass --config.data_dir=DIR.")


class _DropAbslWarnings(logging.Filter):
  def filter(self, record):
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet():
  """Hides TFDS's "Downloading and preparing dataset Unknown size", its progress bars and the
  missing-dataset_info.json warning of a first generation: on an offline machine they read
  like a failed download. Shown after all if the generation fails."""
  captured = io.StringIO()
  absl_logger, muted = logging.getLogger("absl"), _DropAbslWarnings()
  absl_logger.addFilter(muted)
  try:
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
      yield
  except BaseException:
    sys.stderr.write(captured.getvalue())
    raise
  finally:
    absl_logger.removeFilter(muted)


def _local_builder(spec: DatasetSpec, data_dir: str):
  with _quiet():
    return spec.local_builder()(data_dir=data_dir, file_format="array_record")


def ensure_prepared(spec: DatasetSpec, data_dir: Optional[str] = None) -> str:
  """Generates a locally buildable dataset if needed; fails fast for one that is not.

  Returns:
    The data_dir used.
  """
  data_dir = paths.resolve(data_dir) or default_data_dir()
  # Registered numpy arrays: nothing to prepare (text specs have no such field).
  if getattr(spec, "in_memory_splits", None) is not None:
    return data_dir
  import tensorflow_datasets as tfds
  if spec.local_builder is not None:
    with _quiet():
      builder = spec.local_builder()(data_dir=data_dir, file_format="array_record")
      prepared = builder.is_prepared()
    if not prepared:
      start = time.perf_counter()
      print(f"Generating {spec.tfds_name} into {builder.data_dir}, once (offline; set "
            "--config.data_dir or $KDJAX_DATA_DIR to put it elsewhere) ...", end=" ",
            flush=True)
      try:
        with _quiet():
          builder.download_and_prepare()
      except OSError as error:  # A full disk or a read-only data_dir: one line, no traceback.
        print(flush=True)
        raise DatasetNotPreparedError(
            f"Generating {spec.tfds_name!r} into {builder.data_dir!r} failed: "
            f"{error.strerror or error}; free space there or set --config.data_dir (or "
            "$KDJAX_DATA_DIR) to another directory. Nothing half-written is used.") from None
      print(f"done in {time.perf_counter() - start:.1f} s.", flush=True)
    return data_dir
  # `tfds.data_source` on an unprepared dataset would try to download (and retry for minutes
  # when offline); check first and say how to prepare it instead.
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  except Exception as error:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir)) from error
  if not prepared:
    raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir))
  return data_dir


def load_split(spec: DatasetSpec, split: str, data_dir: Optional[str] = None):
  """Returns a random-access source of dict records for one split."""
  if getattr(spec, "in_memory_splits", None) is not None:
    if split not in spec.in_memory_splits:
      raise ValueError(f"Dataset {spec.tfds_name!r} has the splits "
                       f"{sorted(spec.in_memory_splits)}, not {split!r}.")
    return spec.in_memory_splits[split]
  import tensorflow_datasets as tfds
  data_dir = ensure_prepared(spec, data_dir)
  if spec.local_builder is not None:
    source = _local_builder(spec, data_dir).as_data_source(split=split)
  else:
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir)
  _check_readable(source, spec, split, data_dir)
  return source


class DamagedDatasetError(DatasetNotPreparedError):
  """A prepared dataset whose files cannot be read back (truncated, overwritten)."""


def _check_readable(source, spec: DatasetSpec, split: str, data_dir: str) -> None:
  """Reads the split's first and last records: a truncated or damaged record file fails here,
  in one line naming it, not as a reader's traceback in the middle of training."""
  try:
    if len(source):
      source[0]
      source[len(source) - 1]
  except Exception as error:  # pylint: disable=broad-except  (each reader has its own types)
    where = os.path.join(data_dir, spec.tfds_name)
    regenerate = ("delete it to generate it again" if spec.local_builder is not None else
                  "prepare it again")
    raise DamagedDatasetError(
        f"Dataset {spec.tfds_name!r} split {split!r} in {where!r} cannot be read "
        f"({type(error).__name__}: {' '.join(str(error).split())[:160]}); {regenerate}.") from None


class ArraySource:
  """Numpy arrays as a random-access source of records `{'inputs': x[i], 'label': y[i]}`
  (the interface of `tfds.data_source`: `len`, `[i]`, `__getitems__`)."""

  INPUT_KEY, LABEL_KEY = "inputs", "label"

  def __init__(self, inputs: np.ndarray, labels: np.ndarray):
    self.inputs, self.labels = inputs, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {self.INPUT_KEY: self.inputs[index], self.LABEL_KEY: self.labels[index]}

  def __getitems__(self, indices) -> list:
    return [self[int(i)] for i in indices]


def _checked_split(name: str, split: str, pair, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  where = f"register_arrays({name!r}): {split}"
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    raise ValueError(f"{where} must be a pair (inputs [N, ...], labels [N]); got "
                     f"{type(pair).__name__}.")
  inputs, labels = np.asarray(pair[0]), np.asarray(pair[1])
  if inputs.ndim < 2 or labels.ndim != 1 or len(inputs) != len(labels) or not len(labels):
    raise ValueError(f"{where} must be inputs [N, ...] and labels [N] with the same N > 0; got "
                     f"shapes {inputs.shape} and {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where} labels must be integers (class ids); got dtype {labels.dtype}.")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(f"{where} labels must lie in [0, {num_classes}) (num_classes="
                     f"{num_classes}); label {int(labels[bad[0]])} at row {int(bad[0])} does not.")
  if np.issubdtype(inputs.dtype, np.inexact):
    finite = np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1)
    if not finite.all():  # A NaN input would train, then evaluate to a NaN cross-entropy.
      rows = np.flatnonzero(~finite)
      raise ValueError(f"{where} inputs must be finite; {rows.size} row(s) hold NaN or inf, the "
                       f"first at row {int(rows[0])}.")
  return inputs, labels.astype(np.int32)


def register_arrays(  # pylint: disable=redefined-builtin
    name: str, *, train, eval, num_classes: int, input_kind: str,
    preprocess: Optional[Callable] = None, replace: bool = False) -> DatasetSpec:
  """Registers in-memory numpy arrays as the dataset `name` (`config.dataset=name`).

  Args:
    name: the dataset's name in configs.
    train: `(inputs [N, ...], labels [N])`, the training split (integer labels).
    eval: `(inputs [M, ...], labels [M])`, the evaluation split (same input shape).
    num_classes: the number of classes; labels must lie in [0, num_classes).
    input_kind: the kind of inputs ('signal1d', 'image32', 'image224', or a kind of your own);
      only models registered with the same kind are accepted for it.
    preprocess: `(inputs [b, ...] as stored, rng or None, rows=None) -> float32 inputs`, as
      `DatasetSpec.preprocess`: `rng` (a numpy Generator) is given for training batches when
      `config.augment` is on, None at evaluation. Default: cast to float32.
    replace: allow replacing an earlier registration of `name`.

  Returns:
    The registered `DatasetSpec` (its `input_shape` is that of one preprocessed input).

  The arrays live in this process only: register them in every process of a multi-host run
  (each reads its own rows), and again before `kdjax.load_run` if you evaluate there.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"register_arrays({name!r}): num_classes must be an integer >= 2; got "
                     f"{num_classes!r}.")
  if not isinstance(input_kind, str) or not input_kind:
    raise ValueError(f"register_arrays({name!r}): input_kind must be a non-empty string such as "
                     f"'signal1d' or 'image32'; got {input_kind!r}.")
  train_inputs, train_labels = _checked_split(name, "train", train, num_classes)
  eval_inputs, eval_labels = _checked_split(name, "eval", eval, num_classes)
  if train_inputs.shape[1:] != eval_inputs.shape[1:]:
    raise ValueError(f"register_arrays({name!r}): train and eval inputs differ in shape: "
                     f"{train_inputs.shape[1:]} vs {eval_inputs.shape[1:]} per example.")
  if preprocess is None:
    preprocess = lambda inputs, rng, rows=None: np.asarray(inputs, np.float32)
  elif not callable(preprocess):
    raise ValueError(f"register_arrays({name!r}): preprocess must be a function (inputs, rng, "
                     f"rows=None) -> float32 inputs; got {type(preprocess).__name__}.")
  sample = np.asarray(preprocess(train_inputs[:2], None, None))
  if sample.shape[:1] != (min(2, len(train_inputs)),):
    raise ValueError(f"register_arrays({name!r}): preprocess must keep the batch axis; it mapped "
                     f"inputs {train_inputs[:2].shape} to {sample.shape}.")
  spec = DatasetSpec(
      tfds_name=name, input_key=ArraySource.INPUT_KEY, label_key=ArraySource.LABEL_KEY,
      num_classes=num_classes, input_shape=tuple(sample.shape[1:]), input_kind=input_kind,
      train_split="train", eval_split="eval", train_examples=len(train_labels),
      preprocess=preprocess,
      in_memory_splits={"train": ArraySource(train_inputs, train_labels),
                        "eval": ArraySource(eval_inputs, eval_labels)})
  catalog.register(name, spec, replace=replace)
  return spec
