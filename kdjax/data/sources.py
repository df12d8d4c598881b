"""Random-access TFDS data sources (array_record), read without TensorFlow.

Every dataset, the offline MNIST-1D included, goes through `tfds.data_source`; datasets with
a local builder are generated into `data_dir` on first use.
"""

import os
from typing import Optional

from kdjax.data.catalog import DatasetSpec


def default_data_dir() -> str:
  return os.environ.get("KDJAX_DATA_DIR") or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


class DatasetNotPreparedError(RuntimeError):
  pass


def _not_prepared_message(spec: DatasetSpec, data_dir: str) -> str:
  return (
      f"Dataset {spec.tfds_name!r} is not prepared in data_dir={data_dir!r} and this machine "
      "cannot download it. Prepare it offline: on a machine with internet run\n"
      f"  tfds build {spec.tfds_name} --data_dir=DIR --file_format=array_record\n"
      "(or place the original archives in DIR/downloads/manual and run the same command), then "
      f"copy DIR/{spec.tfds_name} into {data_dir!r} or pass --config.data_dir=DIR.")


def ensure_prepared(spec: DatasetSpec, data_dir: Optional[str] = None) -> str:
  """Generates a locally buildable dataset if needed; fails fast for one that is not.

  Returns:
    The data_dir used.
  """
  import tensorflow_datasets as tfds
  data_dir = data_dir or default_data_dir()
  if spec.local_builder is not None:
    builder = spec.local_builder()(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
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
    builder = spec.local_builder()(data_dir=data_dir, file_format="array_record")
    return builder.as_data_source(split=split)
  return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir)
