"""Datasets (TFDS, array_record, no TensorFlow needed) and deterministic input pipelines."""

from kdjax.data.catalog import DATASETS, DatasetSpec, get_dataset_spec
from kdjax.data.pipeline import InputPipeline, InvalidLabelsError
from kdjax.data.sources import DatasetNotPreparedError, default_data_dir, ensure_prepared

__all__ = ["DATASETS", "DatasetSpec", "get_dataset_spec", "InputPipeline", "InvalidLabelsError",
           "DatasetNotPreparedError", "default_data_dir", "ensure_prepared"]
