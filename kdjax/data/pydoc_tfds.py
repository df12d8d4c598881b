"""Python's own documentation topics as a TFDS text dataset, built offline (array_record).

`pydoc_data.topics.topics` ships with every CPython: the text `help('with')` prints, one
document per language topic (79 topics, about 465k characters on CPython 3.11). It is a
small English-and-code corpus that needs no download, for language-model distillation on
a machine without internet. The exact text depends on the Python version that builds it.

Split by topic, not by character, so no document is in both splits: topics are ordered by
the sha256 of their name (stable across runs, machines and Python's hash seed) and taken
into `eval` in that order while they fit in `EVAL_FRACTION` of the characters; the rest
are `train`.

The records are read back with `tfds.data_source` (random access, no TensorFlow needed).
"""

import hashlib

import tensorflow_datasets as tfds

EVAL_FRACTION = 0.1


def _topics() -> dict:
  from pydoc_data.topics import topics
  return dict(topics)


def split_topics(topics: dict, eval_fraction: float = EVAL_FRACTION) -> tuple:
  """Returns (train topic names, eval topic names), each sorted.

  Args:
    topics: topic name -> text.
    eval_fraction: the most characters the eval topics may hold, as a fraction of all.
  """
  if not 0 < eval_fraction < 1:
    raise ValueError(f"eval_fraction={eval_fraction} must lie in (0, 1).")
  budget = eval_fraction * sum(len(text) for text in topics.values())
  eval_topics, eval_chars = [], 0
  for name in sorted(topics, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()):
    # Skip a topic that would overshoot rather than stop: the split then lands close to
    # the fraction instead of one long topic above it.
    if eval_chars + len(topics[name]) <= budget:
      eval_topics.append(name)
      eval_chars += len(topics[name])
  train_topics = sorted(set(topics) - set(eval_topics))
  if not eval_topics or not train_topics:
    raise ValueError(f"Cannot split {len(topics)} topics with eval_fraction={eval_fraction}.")
  return train_topics, sorted(eval_topics)


class PydocTopics(tfds.core.GeneratorBasedBuilder):
  """`pydoc_data.topics.topics`, one record per topic, split train/eval by topic."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "pydoc_data.topics of the building Python; ~10% of chars in eval."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Written out explicitly: dataset_info_from_configs needs a builder defined in a
    # dataset package directory, which this plain module is not.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python documentation topics (pydoc_data.topics), split by topic.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "topic": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/library/pydoc.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    topics = _topics()
    train_topics, eval_topics = split_topics(topics)
    return {
        "train": self._generate_examples(topics, train_topics),
        "eval": self._generate_examples(topics, eval_topics),
    }

  def _generate_examples(self, topics, names):
    for name in names:
      yield name, {"text": topics[name], "topic": name}
