"""Input pipelines: deterministic training batches by step, padded evaluation batches.

Training batch `step` is a pure function of (seed, step): grain's `MapDataset` order gives a
fresh shuffle of the example indices each epoch (`range(n).shuffle(seed).repeat()`, computed an
epoch at a time by `kdjax.data.index_shuffle`), and the batch
takes the `global_batch_size` positions from `step * global_batch_size` of that stream.
A resumed run therefore sees exactly the batches an uninterrupted run would. Each process
reads only its own rows of the global batch (multi-host).

`sampler='class_pairs'` (CS-KD) makes the second half of every global batch the same-class
partners of the first half (`kdjax.data.pairing`); the default 'uniform' sampler is unchanged.
"""

from typing import Iterator, Optional

import threading

import numpy as np

from kdjax.data import index_shuffle, pairing, sources
from kdjax.data.catalog import DatasetSpec, get_dataset_spec

# Datasets up to this many bytes are read once into host memory (MNIST-1D: 0.8 MB) instead
# of record by record; the batches are the same either way.
_IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


class _RecordArrays:
  """A split stacked into numpy arrays: `arrays[key][indices]` is a batch gather."""

  def __init__(self, source, keys):
    records = source.__getitems__(list(range(len(source))))
    self.arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}
    self.num_examples = len(source)

  def gather(self, indices: np.ndarray) -> dict:
    return {k: v[indices] for k, v in self.arrays.items()}


class _RecordReader:
  """Reads records one by one from a random-access source (large datasets)."""

  def __init__(self, source, keys, variable_size_keys=()):
    self.source, self.keys, self.num_examples = source, keys, len(source)
    self.variable_size_keys = variable_size_keys

  def gather(self, indices: np.ndarray) -> dict:
    records = self.source.__getitems__([int(i) for i in indices])
    return {k: [np.asarray(r[k]) for r in records] if k in self.variable_size_keys else
            np.stack([np.asarray(r[k]) for r in records]) for k in self.keys}


class _EpochOrder:
  """grain's shuffled stream of example positions, `range(n).shuffle(seed).repeat()`, read one
  whole epoch at a time: `take(start, count)`.

  grain computes each position separately (~60 us an index through `MapDataset`: 8 ms of a
  quickstart batch whose train step takes 1.5 ms). `kdjax.data.index_shuffle` computes the
  same cipher for a whole epoch at once (~5 ms for MNIST-1D's 4000 or CIFAR's 50 000, against
  0.24 s and 3 s through grain); an epoch is kept for the two most recent epochs and batches
  slice it. The order is grain's exactly (tests/data/test_index_shuffle.py compares them), so
  the published numbers do not depend on this. Thread-safe: the prefetch workers and the
  main thread may ask at once.
  """

  def __init__(self, num_examples: int, seed: int):
    if not 0 <= seed < 2**32:  # grain's shuffle refuses other seeds the same way.
      raise ValueError(f"seed={seed} must be an integer in [0, 2**32) (the training shuffle's "
                       "uint32 seed).")
    self.num_examples, self.seed = num_examples, seed
    self._epochs, self._lock = {}, threading.Lock()

  def _epoch(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._epochs.get(epoch)
      if order is None:
        # grain's ShuffleMapDataset reseeds every epoch with (seed + epoch) mod 2**32.
        order = index_shuffle.epoch_permutation(self.num_examples,
                                                (self.seed + epoch) % 2**32)
        self._epochs = {e: o for e, o in self._epochs.items() if e >= epoch - 1}
        self._epochs[epoch] = order
      return order

  def take(self, start: int, count: int) -> np.ndarray:
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      out[here] = self._epoch(int(epoch))[offsets[here]]
    return out


_VALIDATION_SEED = 20_260_127  # Fixes which training examples a held-out validation set takes.


class InvalidLabelsError(ValueError):
  """A dataset's labels do not fit its number of classes."""


def _check_labels(spec, split, source, reader):
  """Labels outside [0, num_classes) are refused once, here: inside the jitted step a loss
  cannot raise, and an out-of-range label would silently index a wrong (clipped) class."""
  if isinstance(reader, _RecordArrays):
    labels = reader.arrays[spec.label_key]
    bad = np.flatnonzero((labels < 0) | (labels >= spec.num_classes))
    if bad.size:
      raise InvalidLabelsError(
          f"Dataset {spec.tfds_name!r} split {split!r}: {bad.size} of {labels.size} labels lie "
          f"outside [0, {spec.num_classes}) (e.g. record {int(bad[0])} has label "
          f"{int(labels[bad[0]])}); the dataset does not match num_classes={spec.num_classes}.")
    return
  # Records read lazily: the declared ClassLabel size is what can be checked up front.
  info = getattr(source, "dataset_info", None)
  feature = info.features[spec.label_key] if info is not None else None
  declared = getattr(feature, "num_classes", None)
  if declared is not None and declared > spec.num_classes:
    raise InvalidLabelsError(
        f"Dataset {spec.tfds_name!r} split {split!r} declares {declared} classes for "
        f"{spec.label_key!r}, more than num_classes={spec.num_classes}.")


def _reader(spec, split, data_dir, in_memory):
  source = sources.load_split(spec, split, data_dir)
  keys = (spec.input_key, spec.label_key)
  if spec.variable_input_size:  # A list of differently sized arrays: never stacked.
    reader = _RecordReader(source, keys, variable_size_keys=(spec.input_key,))
    _check_labels(spec, split, source, reader)
    return reader
  if in_memory is None:
    first = source[0]
    record_bytes = sum(np.asarray(first[k]).nbytes for k in keys)
    in_memory = record_bytes * len(source) <= _IN_MEMORY_LIMIT_BYTES
  reader = _RecordArrays(source, keys) if in_memory else _RecordReader(source, keys)
  _check_labels(spec, split, source, reader)
  return reader


class InputPipeline:
  """Training and evaluation batches for one dataset.

  Batches are dicts of numpy arrays: `inputs` [b, ...] float32, `labels` [b] int32, for
  training `index` [b] int32 (each example's position in the training split) and, for
  evaluation, `mask` [b] bool (False on padding rows). `b` is this process's share of the
  global batch size.

  `sampler`: 'uniform' (every row a fresh example of the epoch's shuffle) or 'class_pairs'
  (rows `B/2 + i` are same-class partners of rows `i`, drawn from the training examples only,
  never the held-out validation ones; training batches then also carry `partner_row` [b],
  see `kdjax.data.pairing`).

  `teacher_cache`: a `kdjax.teachers.disk_cache.TeacherCache` written for this pipeline's seed
  and batch size; training batches then also carry the cached teacher outputs of their rows
  ('teacher_logits' or 'teacher_topk_logits' / 'teacher_topk_indices', 'teacher_features/<tap>').
  """

  def __init__(self, dataset: str, *, global_batch_size: int, seed: int,
               data_dir: Optional[str] = None, process_index: int = 0, process_count: int = 1,
               in_memory: Optional[bool] = None, augment: bool = True,
               validation_examples: int = 0, sampler: str = "uniform",
               teacher_cache=None):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the process "
                       f"count {process_count}.")
    self.sampler = pairing.check_sampler(sampler)
    if sampler == "class_pairs":
      pairing.check_paired_batch_size(global_batch_size)
    self.spec: DatasetSpec = get_dataset_spec(dataset)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.augment = augment
    # A `kdjax.teachers.disk_cache.TeacherCache`: its rows for each step join the batch.
    self.teacher_cache = teacher_cache
    self._train = _reader(self.spec, self.spec.train_split, data_dir, in_memory)
    self._eval = _reader(self.spec, self.spec.eval_split, data_dir, in_memory)
    total = self._train.num_examples
    if not 0 <= validation_examples < total:
      raise ValueError(f"validation_examples={validation_examples} must be in [0, {total}) (the "
                       f"training split of {self.spec.tfds_name!r} has {total} examples).")
    # A held-out validation set carved from the training split for model selection: the same
    # examples whatever the run's seed (a fixed permutation), never trained on.
    carve = np.random.default_rng(_VALIDATION_SEED).permutation(total)
    self._train_indices = np.sort(carve[:total - validation_examples])
    self._validation_indices = np.sort(carve[total - validation_examples:])
    # Infinite stream of example indices, reshuffled every epoch.
    self._order = _EpochOrder(len(self._train_indices), seed)
    self._partners = (pairing.ClassPartners(self.train_labels(), self._train_indices,
                                            dataset=self.spec.tfds_name)
                      if sampler == "class_pairs" else None)

  @property
  def num_train_examples(self) -> int:
    """The training split's size: the range of `index`, held-out validation examples included."""
    return self._train.num_examples

  def train_labels(self) -> Optional[np.ndarray]:
    """Every training example's label [N] (by index) when the split is held in memory; None
    for splits read record by record (reading them all would decode every input)."""
    if isinstance(self._train, _RecordArrays):
      return np.asarray(self._train.arrays[self.spec.label_key])
    return None

  @property
  def num_eval_examples(self) -> int:
    return self._eval.num_examples

  def split_arrays(self, split: str):
    """(records as stacked arrays or None, number of examples) of the 'train' or 'eval' split;
    None for a split read record by record (for provenance fingerprints)."""
    reader = {"train": self._train, "eval": self._eval}[split]
    return (reader.arrays if isinstance(reader, _RecordArrays) else None), reader.num_examples

  def _prepare(self, raw: dict, rng, rows=None) -> dict:
    return {
        "inputs": self.spec.preprocess(raw[self.spec.input_key], rng, rows),
        "labels": np.asarray(raw[self.spec.label_key], np.int32),
    }

  def train_batch(self, step: int) -> dict:
    """This process's rows of global training batch `step`."""
    local = slice(self.process_index * self.local_batch_size,
                  (self.process_index + 1) * self.local_batch_size)
    if self._partners is not None:
      indices = self._paired_indices(step)[local]
    else:
      indices = self.train_indices(step * self.global_batch_size + local.start,
                                   self.local_batch_size)
    # One generator per global batch: an example's augmentation is the same however the
    # batch is split over processes.
    rng = np.random.default_rng([self.seed, step]) if self.augment else None
    rows = (self.process_index * self.local_batch_size, self.global_batch_size)
    batch = self._prepare(self._train.gather(indices), rng, rows)
    batch["index"] = indices.astype(np.int32)  # For per-example method state (Batch.data).
    if self._partners is not None:
      batch[pairing.PARTNER_ROW_KEY] = pairing.partner_rows(self.global_batch_size)[local]
    if self.teacher_cache is not None:
      batch.update(self.teacher_cache.rows(step, local, index=batch["index"],
                                           inputs=batch["inputs"]))
    return batch

  def train_indices(self, start: int, count: int) -> np.ndarray:
    """Positions start .. start + count - 1 of the shuffled stream of training examples (the
    'uniform' sampler's global order: batch `step` is positions `step * B` .. `(step + 1) * B
    - 1`), as indices into the training split; int64 [count]."""
    return self._train_indices[self._order.take(start, count)]

  def _paired_indices(self, step: int) -> np.ndarray:
    """Global batch `step` of the 'class_pairs' sampler: `B/2` anchors from the epoch's
    shuffle, then their partners. Built whole on every process (the partners of one
    process's anchors may be another's rows), which costs `B/2` index look-ups."""
    half = self.global_batch_size // 2
    anchors = self.train_indices(step * half, half)
    partners = self._partners.draw(anchors, seed=self.seed, step=step)
    return np.concatenate([anchors, partners])

  @property
  def num_validation_examples(self) -> int:
    return len(self._validation_indices)

  def eval_batches(self, global_batch_size: Optional[int] = None, *,
                   split: str = "eval") -> Iterator[dict]:
    """The whole eval split (or, with `split='validation'`, the held-out validation examples
    of the training split) once, in order, last batch padded (mask False on padding)."""
    global_batch_size = global_batch_size or self.global_batch_size
    process_count = self.global_batch_size // self.local_batch_size
    local = global_batch_size // process_count
    if split == "validation":
      reader, rows = self._train, self._validation_indices
    elif split == "eval":
      reader, rows = self._eval, np.arange(self._eval.num_examples)
    else:
      raise ValueError(f"split={split!r}: 'eval' or 'validation'.")
    total = len(rows)
    for begin in range(0, total, global_batch_size):
      positions = begin + self.process_index * local + np.arange(local)
      mask = positions < total
      raw = reader.gather(rows[np.where(mask, positions, 0)])
      batch = self._prepare(raw, None)
      batch["mask"] = mask
      yield batch

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
      yield self.train_batch(step)
      step += 1
