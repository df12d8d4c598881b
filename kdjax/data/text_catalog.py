"""The text datasets kdjax knows by name, for language-model training and distillation.

A text dataset is a TFDS dataset of documents (a string field per record). The language-model
pipeline (`kdjax.data.lm_pipeline`) tokenizes them into one stream per split and cuts it into
fixed-length windows; the vocabulary size and sequence length, hence `num_classes` and
`input_shape`, are known only once a tokenizer and a sequence length are chosen, so the
pipeline hands out a copy of the spec with them filled in.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class TextDatasetSpec:
  """How to read one TFDS text dataset.

  Attributes:
    tfds_name: the TFDS name (`tfds.data_source(tfds_name)`).
    text_key: the record field holding a document's text.
    train_split / eval_split: TFDS split names.
    order_key: a record field to sort documents by, or None to keep the source's order
      (deterministic for a given prepared dataset: array_record files come back in hashed
      order). Sorting makes the stream independent of how TFDS hashed the keys.
    local_builder: a `GeneratorBasedBuilder` class that generates the data offline, or None
      for datasets that must be prepared by `tfds build` beforehand.
    input_kind: always 'tokens'; models declare the kind they take.
    input_dtype: the dtype of `tokens`.
    num_classes: the vocabulary size; None in the catalog, set by the pipeline.
    input_shape: `(sequence_length,)`; None in the catalog, set by the pipeline.
    train_examples: number of training windows; None in the catalog (it depends on the
      tokenizer and sequence length), set by the pipeline.
  """
  tfds_name: str
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "test"
  order_key: Optional[str] = None
  local_builder: Optional[Callable] = None
  input_kind: str = "tokens"
  input_dtype: type = np.int32
  num_classes: Optional[int] = None
  input_shape: Optional[tuple] = None
  train_examples: Optional[int] = None
  variable_input_size: bool = False


def _pydoc_builder():
  from kdjax.data.pydoc_tfds import PydocTopics
  return PydocTopics


TEXT_DATASETS = {
    # Offline: generated from the running Python's `pydoc_data.topics` (see pydoc_tfds.py).
    "pydoc": TextDatasetSpec(
        tfds_name="pydoc_topics", train_split="train", eval_split="eval", order_key="topic",
        local_builder=_pydoc_builder),
    # Karpathy's char-rnn corpus: each split is ONE record (train ~1.0M characters);
    # TFDS also has a 'validation' split of the same size as 'test'.
    "tiny_shakespeare": TextDatasetSpec(
        tfds_name="tiny_shakespeare", train_split="train", eval_split="test"),
    # One Billion Word benchmark (Chelba et al. 2013): one sentence per record, ~30M train.
    "lm1b": TextDatasetSpec(tfds_name="lm1b", train_split="train", eval_split="test"),
}


def get_text_dataset_spec(name: str) -> TextDatasetSpec:
  if name not in TEXT_DATASETS:
    raise ValueError(
        f"Unknown text dataset {name!r}; valid text datasets: {', '.join(sorted(TEXT_DATASETS))}.")
  return TEXT_DATASETS[name]
