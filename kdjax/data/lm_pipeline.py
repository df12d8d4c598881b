"""Language-model input pipeline: tokenized documents packed into fixed-length windows.

Packing (as GPT-2 / nanoGPT training data, with explicit document boundaries): every
document of a split becomes `[BOS] tokens [EOS]`; the documents are concatenated into one
stream per split, and the stream is cut into consecutive, non-overlapping windows of
`T + 1` tokens. One window `w` is one example: `tokens = w[:-1]`, `targets = w[1:]`, so each
example trains T next-token predictions. The last window is padded with PAD; `mask` is False
exactly on the targets that are padding. (Non-overlapping windows leave out the one
transition from a window's last token to the next window's first; every token of the
stream is in exactly one window.)

Training batches follow `kdjax.data.pipeline.InputPipeline`: a grain `MapDataset` gives a
fresh shuffle of the window indices each epoch, and batch `step` is a pure function of
(seed, step); each process reads only its rows of the global batch. The stream is held in
memory (int32; pydoc: ~0.5M tokens with the byte tokenizer).
"""

import dataclasses
from typing import Iterator, Optional

import grain
import numpy as np

from kdjax import paths
from kdjax.data import sources, tokenization
# The seed that fixes which training examples are held out, shared with InputPipeline so
# both carve a validation set the same way.
from kdjax.data.pipeline import _VALIDATION_SEED
from kdjax.data.text_catalog import TextDatasetSpec, get_text_dataset_spec


def read_documents(spec: TextDatasetSpec, split: str, data_dir: Optional[str] = None) -> list:
  """All documents of one split as Python strings, in the spec's deterministic order."""
  source = sources.load_split(spec, split, data_dir)
  records = source.__getitems__(list(range(len(source))))
  if spec.order_key is not None:
    records = sorted(records, key=lambda r: _as_text(r[spec.order_key]))
  return [_as_text(r[spec.text_key]) for r in records]


def _as_text(value) -> str:
  # tfds.features.Text reads back as bytes from an array_record data source.
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def pack_stream(documents, tokenizer) -> np.ndarray:
  """[N] int32: `[BOS] doc [EOS]` for every document, concatenated."""
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  pieces = []
  for ids in tokenizer.encode_batch(documents):
    pieces += [bos, ids, eos]
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def cut_windows(stream: np.ndarray, window: int, pad_id: int) -> np.ndarray:
  """[N] stream -> [ceil(N / window), window]: consecutive windows, the last padded.

  A last window of a single token (no target) is dropped: it would be all padding.
  """
  num_windows = -(-len(stream) // window)
  if num_windows and len(stream) - (num_windows - 1) * window < 2:
    num_windows -= 1
  padded = np.full([num_windows * window], pad_id, np.int32)
  used = min(len(stream), len(padded))
  padded[:used] = stream[:used]
  return padded.reshape(num_windows, window)


class _Windows:
  """One split: its token stream cut into `[num_windows, T + 1]` windows."""

  def __init__(self, stream: np.ndarray, sequence_length: int, pad_id: int, *, split: str,
               dataset: str):
    if len(stream) < sequence_length + 1:
      raise ValueError(
          f"sequence_length={sequence_length} is too long for split {split!r} of {dataset!r}: "
          f"its {len(stream)} tokens fill no window of sequence_length + 1 = "
          f"{sequence_length + 1}; use sequence_length <= {len(stream) - 1}.")
    self.num_tokens = len(stream)
    self.windows = cut_windows(stream, sequence_length + 1, pad_id)
    # Whether each position of a window holds a stream token (not padding).
    self.real = (np.arange(self.windows.size).reshape(self.windows.shape) < len(stream))
    self.num_examples = len(self.windows)

  def gather(self, indices: np.ndarray) -> dict:
    windows, real = self.windows[indices], self.real[indices]
    return {"tokens": windows[:, :-1], "targets": windows[:, 1:], "mask": real[:, 1:]}


class LMInputPipeline:
  """Training and evaluation batches of token windows for one text dataset.

  Batches are dicts of numpy arrays, `b` being this process's share of the global batch:
  `tokens` [b, T] int32, `targets` [b, T] int32 (tokens shifted by one), `mask` [b, T] bool
  (False on padding targets, and on whole padding rows of a last eval batch), and for
  training `index` [b] int32 (the window's position in the training split); with
  `attach_teacher_logits`, the teacher's logits [b, T, V] float32 as well.

  Same interface as `InputPipeline`, so the train loop takes either; `spec` is the text
  spec with `num_classes` = the tokenizer's vocabulary size and `input_shape` = (T,).

  Args:
    dataset: a name in `kdjax.data.text_catalog.TEXT_DATASETS`.
    global_batch_size: windows per training step over all processes.
    seed: the shuffle seed; batch `step` is a pure function of (seed, step).
    sequence_length: T, the tokens per example.
    data_dir: the TFDS data dir (default `sources.default_data_dir()`).
    process_index / process_count: this process's rows of the global batch.
    tokenizer: 'byte' or 'bpe'. A BPE tokenizer is trained on the training split's text
      only (held-out validation windows included: they are cut after tokenizing) and
      saved in / reloaded from `tokenizer_dir`.
    vocab_size: the BPE vocabulary size (leave unset for 'byte').
    tokenizer_dir: where the BPE tokenizer is saved (required for 'bpe').
    validation_examples: windows of the training split held out for model selection, the
      same whatever the seed (as `InputPipeline`).
    in_memory: accepted for interface parity; text streams are always held in memory.
  """

  sampler = "uniform"

  def __init__(self, dataset: str, *, global_batch_size: int, seed: int, sequence_length: int,
               data_dir: Optional[str] = None, process_index: int = 0, process_count: int = 1,
               tokenizer: str = "byte", vocab_size: Optional[int] = None,
               tokenizer_dir: Optional[str] = None, validation_examples: int = 0,
               in_memory: Optional[bool] = None):
    spec = get_text_dataset_spec(dataset)
    if not isinstance(sequence_length, int) or sequence_length < 1:
      raise ValueError(f"sequence_length={sequence_length!r} must be a positive integer.")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible "
                       f"by the process count {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if tokenizer not in tokenization.TOKENIZERS:
      raise ValueError(f"tokenizer={tokenizer!r}; valid tokenizers: "
                       f"{', '.join(tokenization.TOKENIZERS)}.")
    if tokenizer == "bpe" and (tokenizer_dir is None or vocab_size is None):
      raise ValueError("tokenizer='bpe' needs tokenizer_dir (where the trained tokenizer is "
                       f"saved) and vocab_size; got tokenizer_dir={tokenizer_dir!r}, "
                       f"vocab_size={vocab_size!r}.")
    if in_memory is False:
      raise ValueError("in_memory=False: text streams are always held in memory; leave it unset.")
    del in_memory
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.sequence_length = sequence_length

    train_documents = read_documents(spec, spec.train_split, data_dir)
    eval_documents = read_documents(spec, spec.eval_split, data_dir)
    self.tokenizer = tokenization.get_tokenizer(
        tokenizer, vocab_size=vocab_size, directory=paths.resolve(tokenizer_dir),
        texts=train_documents)
    pad_id = self.tokenizer.pad_id
    self._train = _Windows(pack_stream(train_documents, self.tokenizer), sequence_length, pad_id,
                           split=spec.train_split, dataset=dataset)
    self._eval = _Windows(pack_stream(eval_documents, self.tokenizer), sequence_length, pad_id,
                          split=spec.eval_split, dataset=dataset)
    self.spec = dataclasses.replace(spec, num_classes=self.tokenizer.vocab_size,
                                    input_shape=(sequence_length,),
                                    train_examples=self._train.num_examples)

    total = self._train.num_examples
    if not 0 <= validation_examples < total:
      raise ValueError(f"validation_examples={validation_examples} must be in [0, {total}) (the "
                       f"training split of {dataset!r} has {total} windows of "
                       f"sequence_length={sequence_length}).")
    # The same carving as InputPipeline: a fixed permutation, whatever the run's seed.
    carve = np.random.default_rng(_VALIDATION_SEED).permutation(total)
    self._train_indices = np.sort(carve[:total - validation_examples])
    self._validation_indices = np.sort(carve[total - validation_examples:])
    self._order = (grain.MapDataset.range(len(self._train_indices))
                   .shuffle(seed=seed).repeat(None))
    self._teacher_logits = None  # `attach_teacher_logits`.

  @property
  def num_train_examples(self) -> int:
    """Windows in the training split: the range of `index`, validation windows included."""
    return self._train.num_examples

  @property
  def num_eval_examples(self) -> int:
    return self._eval.num_examples

  @property
  def num_validation_examples(self) -> int:
    return len(self._validation_indices)

  @property
  def num_train_tokens(self) -> int:
    """Tokens in the training split's stream (BOS/EOS included, padding excluded)."""
    return self._train.num_tokens

  @property
  def num_eval_tokens(self) -> int:
    return self._eval.num_tokens

  def training_windows(self, indices: np.ndarray) -> dict:
    """The training windows `indices` as a batch ({'tokens', 'targets', 'mask'} [n, T]), for
    offline passes over the training split (data selection)."""
    return self._train.gather(np.asarray(indices))

  def restrict_training(self, indices: np.ndarray) -> None:
    """Trains on the windows `indices` only (held-out validation windows stay out), reshuffled
    by the seed as before: batch `step` stays a pure function of (seed, step, indices)."""
    kept = np.intersect1d(self._train_indices, np.asarray(indices))
    if not len(kept):
      raise ValueError("restrict_training: none of the given windows is a training window.")
    self._train_indices = kept
    self._order = grain.MapDataset.range(len(kept)).shuffle(seed=self.seed).repeat(None)

  def train_labels(self) -> None:
    """Language-model windows have no class label."""
    return None

  def _step_indices(self, step: int) -> np.ndarray:
    """[b] the training windows of this process's rows of global batch `step`."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return self._train_indices[
        np.array([self._order[start + i] for i in range(self.local_batch_size)])]

  def train_window_indices(self, start_step: int, stop_step: int) -> np.ndarray:
    """[(stop - start) * b] the training windows this process reads in steps [start, stop),
    in order (a window read twice appears twice)."""
    if stop_step <= start_step:
      return np.zeros([0], np.int64)
    return np.concatenate([self._step_indices(step) for step in range(start_step, stop_step)])

  def validation_window_indices(self) -> np.ndarray:
    """The held-out validation windows (positions in the training split)."""
    return self._validation_indices

  def split_window_inputs(self) -> dict:
    """{'train': [N_train, T], 'eval': [N_eval, T]}: the model inputs of every window."""
    return {"train": self._train.windows[:, :-1], "eval": self._eval.windows[:, :-1]}

  def attach_teacher_logits(self, lookup, *, key: str, train: bool, evaluate: bool) -> None:
    """Batches carry `key` [b, T, V] = lookup(split, window indices), split 'train' (training
    and validation windows) or 'eval': training batches when `train`, eval and validation
    batches when `evaluate` (`kdjax.teachers.process_logits`, whose batch key `key` is)."""
    self._teacher_logits = lookup
    self._teacher_logits_in = {"train": train, "evaluate": evaluate, "key": key}

  def _with_teacher_logits(self, batch: dict, use: str, split: str, indices) -> dict:
    if self._teacher_logits is not None and self._teacher_logits_in[use]:
      batch[self._teacher_logits_in["key"]] = self._teacher_logits(split, indices)
    return batch

  def train_batch(self, step: int) -> dict:
    """This process's rows of global training batch `step`."""
    indices = self._step_indices(step)
    batch = self._train.gather(indices)
    batch["index"] = indices.astype(np.int32)
    return self._with_teacher_logits(batch, "train", "train", indices)

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
      yield self.train_batch(step)
      step += 1

  def _split_rows(self, split: str):
    if split == "validation":
      return self._train, self._validation_indices
    if split == "eval":
      return self._eval, np.arange(self._eval.num_examples)
    raise ValueError(f"split={split!r}: 'eval' or 'validation'.")

  def eval_batches(self, global_batch_size: Optional[int] = None, *,
                   split: str = "eval") -> Iterator[dict]:
    """The whole eval split (or, with `split='validation'`, the held-out validation windows
    of the training split) once, in order; the last batch is padded with rows whose mask is
    all False."""
    global_batch_size = global_batch_size or self.global_batch_size
    process_count = self.global_batch_size // self.local_batch_size
    if global_batch_size % process_count:
      raise ValueError(f"eval global_batch_size={global_batch_size} is not divisible by the "
                       f"process count {process_count}.")
    local = global_batch_size // process_count
    windows, rows = self._split_rows(split)
    total = len(rows)
    for begin in range(0, total, global_batch_size):
      positions = begin + self.process_index * local + np.arange(local)
      present = positions < total
      indices = rows[np.where(present, positions, 0)]
      batch = windows.gather(indices)
      batch["mask"] = batch["mask"] & present[:, None]
      yield self._with_teacher_logits(batch, "evaluate",
                                      "eval" if split == "eval" else "train", indices)

  def prompts(self, split: str, num: int, prompt_length: int, seed: int) -> np.ndarray:
    """[num, prompt_length] int32: the first tokens of `num` distinct windows of `split`
    ('eval' or 'validation'), drawn by `seed`, from windows with no padding in the prefix
    (for generation and speculative-decoding metrics)."""
    windows, rows = self._split_rows(split)
    if not 1 <= prompt_length <= self.sequence_length:
      raise ValueError(f"prompt_length={prompt_length} must be in [1, sequence_length="
                       f"{self.sequence_length}].")
    eligible = rows[windows.real[rows, prompt_length - 1]] if len(rows) else rows
    if not 1 <= num <= len(eligible):
      raise ValueError(f"num={num} prompts: split {split!r} has {len(eligible)} windows with "
                       f"{prompt_length} tokens; ask for 1 to {len(eligible)}.")
    chosen = np.random.default_rng(seed).choice(eligible, size=num, replace=False)
    return windows.windows[chosen, :prompt_length].astype(np.int32)
