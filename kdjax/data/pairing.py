"""Class-paired training batches for CS-KD (Yun et al. 2020).

With `InputPipeline(..., sampler='class_pairs')` a global training batch of `B` rows holds
`B / 2` anchors followed by one partner for each: row `i + B / 2` is a different training
example of the same class as row `i`. The anchors walk the same seeded, per-epoch shuffle of
the training examples as the uniform sampler (`B / 2` of them per step, so one epoch of
anchors takes `2 N / B` steps); each partner is drawn uniformly from the other training
examples of its anchor's class with a generator seeded by `(seed, step)`. Batch `step` is
therefore a pure function of `(seed, step)`, and a resumed run sees the same pairs.

The layout is the official code's (`PairBatchSampler` in alinlab/cs-kd datasets.py@b706db95
yields `batch_indices + pair_indices`, so its `--batch-size 128` means 256 rows): here
`global_batch_size` counts every row, anchors and partners; the official recipe is
`global_batch_size=256`. One difference: the official partner is `random.choice` over the
whole class, which is the anchor itself with probability `1 / n_class`; here it never is.

The batch says which row is whose partner with `partner_row` [b] int32 (`PARTNER_ROW_KEY`):
on an anchor row the global-batch row of its partner, on a partner row -1. Global rows (not
this process's) keep the meaning the same however the batch is split over processes and
devices; the method gathers the global batch to read the partners' logits.
"""

from typing import Optional

import numpy as np

from kdjax import validation

SAMPLERS = ("uniform", "class_pairs")
PARTNER_ROW_KEY = "partner_row"
# Partners are drawn from a stream of their own, apart from the augmentation's `(seed, step)`
# generator, so that turning pairing on does not change how examples are augmented.
_PARTNER_STREAM = 1


def check_sampler(sampler: str, field: str = "sampler") -> str:
  """Raises ConfigError (a ValueError) naming `field` unless `sampler` is one of SAMPLERS."""
  validation.one_of(field, sampler, SAMPLERS)
  return sampler


def check_paired_batch_size(global_batch_size: int) -> None:
  if global_batch_size < 2 or global_batch_size % 2:
    raise ValueError(f"global_batch_size={global_batch_size}: the 'class_pairs' sampler needs "
                     "an even batch size of at least 2 (half anchors, half their partners).")


def partner_rows(global_batch_size: int) -> np.ndarray:
  """`[B]` int32: `i + B / 2` on the anchor rows `i < B / 2`, -1 on the partner rows."""
  check_paired_batch_size(global_batch_size)
  half = global_batch_size // 2
  return np.concatenate([np.arange(half, 2 * half), np.full(half, -1)]).astype(np.int32)


class ClassPartners:
  """Draws, for training examples, a different training example of the same class.

  Args:
    labels: `[N]` int labels of the whole training split, by index.
    train_indices: the indices that are trained on (the split minus any held-out
      validation examples); partners are drawn among these only.
    dataset: the dataset's name, for error messages.
  """

  def __init__(self, labels: Optional[np.ndarray], train_indices: np.ndarray, *,
               dataset: str = "the dataset"):
    if labels is None:
      raise ValueError(f"sampler='class_pairs' needs the training labels in memory, but "
                       f"{dataset!r} is read record by record; use the 'uniform' sampler or "
                       "a dataset held in memory.")
    labels = np.asarray(labels)
    train_indices = np.asarray(train_indices)
    train_labels = labels[train_indices]
    # The training examples grouped by class: class c's members are
    # `self._by_class[self._start[c]:self._start[c] + self._count[c]]`.
    order = np.argsort(train_labels, kind="stable")
    self._by_class = train_indices[order]
    self._count = np.bincount(train_labels, minlength=int(labels.max()) + 1)
    self._start = np.concatenate([[0], np.cumsum(self._count)[:-1]])
    lonely = np.flatnonzero(self._count == 1)
    if lonely.size:
      raise ValueError(
          f"sampler='class_pairs': class {int(lonely[0])} of {dataset!r} has a single training "
          f"example ({lonely.size} such classes), which has no partner of its class; use the "
          "'uniform' sampler or fewer held-out validation examples.")
    # Each training example's rank within its class (-1: not trained on).
    self._rank = np.full(len(labels), -1, np.int64)
    self._rank[self._by_class] = np.arange(len(train_indices)) - np.repeat(self._start,
                                                                           self._count)
    self._labels = labels

  def draw(self, anchors: np.ndarray, *, seed: int, step: int) -> np.ndarray:
    """`[k]` partners for the `[k]` anchor indices of global batch `step`: uniform over the
    other members of each anchor's class (a draw over `n - 1` ranks that skips the anchor's
    own keeps it uniform), a pure function of `(seed, step, anchors)`."""
    anchors = np.asarray(anchors)
    if np.any(self._rank[anchors] < 0):
      raise ValueError("ClassPartners.draw: anchors must be trained-on examples; got held-out "
                       f"index {int(anchors[self._rank[anchors] < 0][0])}.")
    rng = np.random.default_rng([seed, step, _PARTNER_STREAM])
    classes = self._labels[anchors]
    offset = rng.integers(0, self._count[classes] - 1)
    offset = offset + (offset >= self._rank[anchors])
    return self._by_class[self._start[classes] + offset]
