"""Random-access TFDS data sources (array_record), read without TensorFlow.

Every dataset, the offline MNIST-1D included, goes through `tfds.data_source`; datasets with
a local builder are generated into `data_dir` on first use.
"""

import contextlib
import io
import logging
import os
import sys
import time
from typing import Optional

from kdjax import paths
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
  import tensorflow_datasets as tfds
  data_dir = paths.resolve(data_dir) or default_data_dir()
  if spec.local_builder is not None:
    with _quiet():
      builder = spec.local_builder()(data_dir=data_dir, file_format="array_record")
      prepared = builder.is_prepared()
    if not prepared:
      start = time.perf_counter()
      print(f"Generating {spec.tfds_name} into {builder.data_dir}, once (offline; set "
            "--config.data_dir or $KDJAX_DATA_DIR to put it elsewhere) ...", end=" ",
            flush=True)
      with _quiet():
        builder.download_and_prepare()
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
  import tensorflow_datasets as tfds
  data_dir = ensure_prepared(spec, data_dir)
  if spec.local_builder is not None:
    return _local_builder(spec, data_dir).as_data_source(split=split)
  return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir)
