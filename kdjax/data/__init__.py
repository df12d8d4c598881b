"""Datasets (TFDS, array_record, no TensorFlow needed) and deterministic input pipelines."""

from kdjax.data.catalog import DATASETS, DatasetSpec, get_dataset_spec, register, unregister
from kdjax.data.lm_pipeline import LMInputPipeline
from kdjax.data.pipeline import InputPipeline, InvalidLabelsError
from kdjax.data.sources import (ArraySource, DatasetNotPreparedError, default_data_dir,
                                ensure_prepared, register_arrays)
from kdjax.data.text_catalog import TEXT_DATASETS, TextDatasetSpec
from kdjax.data.tokenization import BPETokenizer, ByteTokenizer, fingerprint, get_tokenizer

__all__ = ["DATASETS", "DatasetSpec", "get_dataset_spec", "InputPipeline", "InvalidLabelsError",
           "DatasetNotPreparedError", "default_data_dir", "ensure_prepared", "LMInputPipeline",
           "TEXT_DATASETS", "TextDatasetSpec", "BPETokenizer", "ByteTokenizer", "fingerprint",
           "get_tokenizer", "register", "register_arrays", "unregister", "ArraySource"]
