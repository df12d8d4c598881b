"""The dataset catalog: name, input kind, classes, splits, and whether kdjax generates it
offline or it must be prepared with `tfds build` first."""

import dataclasses
from typing import List

from kdjax.data import catalog
from kdjax.data.text_catalog import TEXT_DATASETS


@dataclasses.dataclass(frozen=True)
class DatasetRow:
  name: str
  input_kind: str
  num_classes: str  # '10', or 'vocabulary' for text.
  splits: str  # 'train / test'
  train_examples: str
  source: str  # 'generated offline' or 'tfds build <name>'


def dataset_rows() -> List[DatasetRow]:
  rows = []
  for name, spec in list(catalog.DATASETS.items()) + list(TEXT_DATASETS.items()):
    classes = "vocabulary" if spec.input_kind == "tokens" else str(spec.num_classes)
    source = ("generated offline" if spec.local_builder is not None else
              "numpy arrays (registered)" if getattr(spec, "in_memory_splits", None) else
              f"tfds build {spec.tfds_name}")
    examples = f"{spec.train_examples:,}" if spec.train_examples else "–"
    rows.append(DatasetRow(name, spec.input_kind, classes,
                           f"{spec.train_split} / {spec.eval_split}", examples, source))
  return rows
