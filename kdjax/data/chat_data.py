"""Prompt/completion data people have: JSONL (or parquet) rows in TRL's dataset formats.

A row is one of (TRL's "prompt-completion" and "conversational" formats):

    {"prompt": "What is 2+2?", "completion": " 4"}
    {"prompt": [{"role": "user", "content": "What is 2+2?"}],
     "completion": [{"role": "assistant", "content": "4"}]}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}

Rendering (`render_row`): with a chat template (the tokenizer directory's jinja template,
`kdjax.models.pretrained.render_chat`), the prompt is the conversation up to the last
assistant turn rendered with `add_generation_prompt=True`, and the completion is what the full
conversation's render adds after it (the assistant's turn and its end-of-turn tokens). A plain
string prompt and completion are wrapped as one user and one assistant message. Without a
template, string prompt and completion are concatenated as they are (TRL's standard format)
and EOS ends the completion; a `messages` row then has no rendering and is refused.

The prompt and the completion are tokenized apart, so the boundary is exact (TRL's
`DataCollatorForCompletionOnlyLM` has to search for it); the loss and distillation mask
(`mask`) is True exactly on targets that are completion tokens.

Layouts (`ChatExamples`), each example `T + 1` tokens cut into `tokens = w[:-1]`,
`targets = w[1:]` as in `kdjax.data.lm_pipeline`:
  * 'padded': one row per example; the prompt is cut to its last `prompt_length` tokens and
    left-padded to exactly `prompt_length`, the completion follows (cut to fit), then PAD. The
    completion starts at position `prompt_length` in every row, so on-policy methods (gkd,
    distillm) generate from `tokens[:, :prompt_length]`, the row's own prompt. (The models
    have no attention mask: a short prompt's left padding is attended to, as PAD tokens.)
  * 'packed': rows concatenated (`prompt completion` each) into one stream cut into
    consecutive windows (no padding but the last window's; prompts do not start windows, so
    this layout is for off-policy methods).
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from kdjax.data import lm_pipeline
from kdjax.data.text_catalog import TextDatasetSpec

LAYOUTS = ("padded", "packed")
EXTENSIONS = (".jsonl", ".json", ".parquet")
# With a teacher tokenizer other than the student's: the teacher's tokenization of the same
# rows, [b, T] ids, and its completion-target mask [b, T] (read by `kdjax.methods.uld`).
TEACHER_TOKENS_KEY = "teacher_tokens"
TEACHER_MASK_KEY = "teacher_mask"


class ChatDataError(ValueError):
  """A data file or row that cannot be read; the message names the file and row."""


def read_rows(path: str) -> List[Dict[str, Any]]:
  """The rows of a `.jsonl` file (one JSON object per line; blank lines skipped) or of a
  `.parquet` file (needs pyarrow)."""
  if not os.path.isfile(path):
    raise ChatDataError(f"{path}: no such data file; give a .jsonl or .parquet file.")
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ChatDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or "
                          "convert the file to JSONL.") from None
    return pq.read_table(path).to_pylist()
  if not path.endswith((".jsonl", ".json")):
    raise ChatDataError(f"{path}: unknown data file type; valid: {', '.join(EXTENSIONS)}.")
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ChatDataError(f"{path}:{number}: not a JSON object ({error.msg}).") from None
      if not isinstance(row, dict):
        raise ChatDataError(f"{path}:{number}: a row must be a JSON object, got "
                            f"{type(row).__name__}.")
      rows.append(row)
  if not rows:
    raise ChatDataError(f"{path}: the file has no rows.")
  return rows


def _messages(value, where: str) -> List[Dict[str, Any]]:
  if isinstance(value, str):
    return None
  if (not isinstance(value, list) or
      not all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
    raise ChatDataError(f"{where}: must be a string or a list of {{'role', 'content'}} "
                        "messages.")
  return value


def render_row(row: Dict[str, Any], *, chat_template: Optional[str],
               special_tokens: Optional[Dict[str, str]] = None,
               where: str = "row") -> Tuple[str, str]:
  """(prompt text, completion text) of one row (see the module docstring)."""
  from kdjax.models.pretrained.tokenizer import render_chat  # pylint: disable=g-import-not-at-top
  special_tokens = special_tokens or {}
  if "messages" in row:
    messages = _messages(row["messages"], f"{where}: 'messages'")
    if messages is None or not messages or messages[-1]["role"] != "assistant":
      raise ChatDataError(f"{where}: 'messages' must be a list of messages ending with an "
                          "assistant turn (the completion).")
    prompt_messages, completion_messages = messages[:-1], messages[-1:]
  elif "prompt" in row and "completion" in row:
    prompt_messages = _messages(row["prompt"], f"{where}: 'prompt'")
    completion_messages = _messages(row["completion"], f"{where}: 'completion'")
    if (prompt_messages is None) != (completion_messages is None):
      raise ChatDataError(f"{where}: 'prompt' and 'completion' must both be strings or both "
                          "lists of messages.")
    if prompt_messages is None:
      if chat_template is None:
        return str(row["prompt"]), str(row["completion"])
      prompt_messages = [{"role": "user", "content": row["prompt"]}]
      completion_messages = [{"role": "assistant", "content": row["completion"]}]
  else:
    raise ChatDataError(f"{where}: a row needs 'prompt' and 'completion', or 'messages'; got "
                        f"keys {sorted(row)}.")
  if chat_template is None:
    raise ChatDataError(f"{where}: conversational rows need a chat template, and the "
                        "tokenizer directory has none (tokenizer_config.json 'chat_template').")
  prompt = render_chat(chat_template, prompt_messages, add_generation_prompt=True,
                       **special_tokens)
  full = render_chat(chat_template, prompt_messages + completion_messages, **special_tokens)
  if not full.startswith(prompt):
    raise ChatDataError(f"{where}: the chat template's render of the whole conversation does "
                        "not start with its render of the prompt; cannot tell the completion "
                        "apart.")
  return prompt, full[len(prompt):]


@dataclasses.dataclass(frozen=True)
class TokenizedRow:
  prompt: np.ndarray  # [p] int32
  completion: np.ndarray  # [c] int32, ending with EOS when the template does not end it


def tokenize_rows(rows: Sequence[Dict[str, Any]], tokenizer, *, chat_template: Optional[str],
                  special_tokens: Optional[Dict[str, str]] = None, eos_id: Optional[int],
                  where: str = "data") -> List[TokenizedRow]:
  """Renders and tokenizes every row; `tokenizer` is a `tokenizers.Tokenizer` (special tokens
  in the rendered text map to their ids; none are added). Without a chat template, `eos_id`
  ends each completion (None: nothing added)."""
  tokenized = []
  for number, row in enumerate(rows, start=1):
    prompt, completion = render_row(row, chat_template=chat_template,
                                    special_tokens=special_tokens, where=f"{where}: row {number}")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    completion_ids = tokenizer.encode(completion, add_special_tokens=False).ids
    if chat_template is None and eos_id is not None:
      completion_ids = completion_ids + [eos_id]
    if not completion_ids:
      raise ChatDataError(f"{where}: row {number} has an empty completion.")
    tokenized.append(TokenizedRow(np.asarray(prompt_ids, np.int32),
                                  np.asarray(completion_ids, np.int32)))
  return tokenized


def padded_examples(rows: Sequence[TokenizedRow], *, sequence_length: int, prompt_length: int,
                    pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
  """'padded' layout: (windows [N, T + 1] int32, completion [N, T + 1] bool).

  `completion[i, j]` is True where token j of row i is a completion token (so the targets'
  mask is `completion[:, 1:]`)."""
  if not 1 <= prompt_length < sequence_length:
    raise ChatDataError(f"prompt_length={prompt_length} must be in [1, sequence_length="
                        f"{sequence_length}).")
  width = sequence_length + 1
  windows = np.full([len(rows), width], pad_id, np.int32)
  completion = np.zeros([len(rows), width], bool)
  for i, row in enumerate(rows):
    prompt = row.prompt[-prompt_length:]
    windows[i, prompt_length - len(prompt):prompt_length] = prompt
    kept = row.completion[:width - prompt_length]
    windows[i, prompt_length:prompt_length + len(kept)] = kept
    completion[i, prompt_length:prompt_length + len(kept)] = True
  return windows, completion


def packed_examples(rows: Sequence[TokenizedRow], *, sequence_length: int,
                    pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
  """'packed' layout: (windows [N, T + 1], completion [N, T + 1]); see the module docstring."""
  stream = np.concatenate([np.concatenate([r.prompt, r.completion]) for r in rows])
  is_completion = np.concatenate([
      np.concatenate([np.zeros(len(r.prompt), bool), np.ones(len(r.completion), bool)])
      for r in rows])
  width = sequence_length + 1
  windows = lm_pipeline.cut_windows(stream, width, pad_id)
  completion = np.zeros(windows.shape, bool)
  flat = completion.reshape(-1)
  used = min(len(is_completion), flat.size)
  flat[:used] = is_completion[:used]
  return windows, completion


class _Examples:
  """One split as `lm_pipeline._Windows` holds it: `windows` [N, T + 1], `real` [N, T + 1]
  (here: completion tokens, whose targets are trained on), `gather(indices)`; with a teacher
  tokenizer of its own, `teacher` = (its windows, its completion) of the same rows."""

  def __init__(self, windows: np.ndarray, completion: np.ndarray, what: str,
               teacher: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    if not len(windows):
      raise ChatDataError(f"{what}: no examples.")
    self.windows, self.real, self.teacher = windows, completion, teacher
    self.num_examples = len(windows)
    self.num_tokens = int(completion.sum())

  def gather(self, indices: np.ndarray) -> dict:
    windows, real = self.windows[indices], self.real[indices]
    batch = {"tokens": windows[:, :-1], "targets": windows[:, 1:], "mask": real[:, 1:]}
    if self.teacher is not None:
      teacher_windows, teacher_completion = (x[indices] for x in self.teacher)
      batch[TEACHER_TOKENS_KEY] = teacher_windows[:, :-1]
      batch[TEACHER_MASK_KEY] = teacher_completion[:, 1:]
    return batch


class ChatTokenizer:
  """A pretrained directory's tokenizer with the attributes kdjax's pipelines read
  (`vocab_size` = the model's, `pad_id`, `bos_id`, `eos_id`, `encode`, `decode`)."""

  name = "pretrained"

  def __init__(self, tokenizer, *, vocab_size: int, pad_id: int, bos_id: Optional[int],
               eos_id: Optional[int], chat_template: Optional[str],
               special_tokens: Dict[str, str]):
    self.tokenizer, self.vocab_size = tokenizer, vocab_size
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self.chat_template, self.special_tokens = chat_template, special_tokens

  @classmethod
  def from_directory(cls, directory: str) -> "ChatTokenizer":
    """The tokenizer of a Hugging Face-format directory (config.json's vocabulary size and
    special ids; PAD falls back to EOS, then 0, as TRL does for Llama)."""
    from kdjax.models.pretrained import directory as directory_lib  # pylint: disable=g-import-not-at-top
    from kdjax.models.pretrained import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    config = directory_lib.read_config(directory)
    tokenizer = tokenizer_lib.load_tokenizer(directory)
    if tokenizer is None:
      raise ChatDataError(f"{directory}: no {tokenizer_lib.TOKENIZER_FILE}; the data is "
                          "tokenized with the teacher directory's tokenizer.")
    tokenizer_lib.check_vocabulary(tokenizer, config.vocab_size, directory)
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (tuple, list)) else eos
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or 0)
    return cls(tokenizer, vocab_size=config.vocab_size, pad_id=pad, bos_id=config.bos_token_id,
               eos_id=eos, chat_template=tokenizer_lib.load_chat_template(directory),
               special_tokens=tokenizer_lib.special_tokens(directory))

  def encode(self, text: str) -> List[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def build_examples(path: str, tokenizer: ChatTokenizer, *, sequence_length: int,
                   layout: str, prompt_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """(windows, completion) [N, T + 1] of one file."""
  if layout not in LAYOUTS:
    raise ChatDataError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}.")
  rows = tokenize_rows(read_rows(path), tokenizer.tokenizer,
                       chat_template=tokenizer.chat_template,
                       special_tokens=tokenizer.special_tokens, eos_id=tokenizer.eos_id,
                       where=path)
  if layout == "padded":
    return padded_examples(rows, sequence_length=sequence_length, prompt_length=prompt_length,
                           pad_id=tokenizer.pad_id)
  return packed_examples(rows, sequence_length=sequence_length, pad_id=tokenizer.pad_id)


class ChatInputPipeline(lm_pipeline.LMInputPipeline):
  """Training and evaluation batches of prompt/completion examples, with the interface (and
  the batching, shuffling, validation carving and per-process rows) of
  `lm_pipeline.LMInputPipeline`; `mask` is True on completion targets only.

  Args:
    train_file: the training rows (.jsonl / .parquet).
    eval_file: the evaluation rows; '' or None: the last `eval_fraction` of the training rows
      (at least one row, in file order) are held out instead.
    tokenizer: a `ChatTokenizer` (the teacher directory's; the student's with
      `teacher_tokenizer`).
    teacher_tokenizer: for cross-tokenizer distillation (`uld`), the teacher directory's
      `ChatTokenizer` when it differs from the student's: every batch then also carries the
      teacher's tokenization of the same rows, 'teacher_tokens' and 'teacher_mask' [b, T]
      (same layout, 'padded' only: row by row, so the completions can be aligned).
    sequence_length, layout, prompt_length: see the module docstring.
    global_batch_size, seed, process_index, process_count, validation_examples: as
      `LMInputPipeline`.
  """

  def __init__(self, train_file: str, *, tokenizer: ChatTokenizer, global_batch_size: int,
               seed: int, sequence_length: int, layout: str = "padded",
               prompt_length: int = 0, eval_file: Optional[str] = None,
               eval_fraction: float = 0.1, process_index: int = 0, process_count: int = 1,
               validation_examples: int = 0,
               teacher_tokenizer: Optional[ChatTokenizer] = None):
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible "
                       f"by the process count {process_count}.")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index, self.seed = process_index, seed
    self.sequence_length, self.layout, self.prompt_length = (sequence_length, layout,
                                                             prompt_length)
    self.tokenizer = tokenizer
    if teacher_tokenizer is not None and layout != "padded":
      raise ChatDataError(f"layout={layout!r} with a teacher tokenizer of its own: only "
                          "'padded' keeps rows apart, so that the completions can be aligned.")
    build = lambda path, tok: build_examples(path, tok, sequence_length=sequence_length,
                                             layout=layout, prompt_length=prompt_length)

    def both(path):
      """(windows, completion, teacher's (windows, completion) or None) of one file."""
      windows, completion = build(path, tokenizer)
      return windows, completion, (None if teacher_tokenizer is None
                                   else build(path, teacher_tokenizer))

    windows, completion, teacher = both(train_file)
    if eval_file:
      eval_windows, eval_completion, eval_teacher = both(eval_file)
    else:
      held_out = max(1, int(round(eval_fraction * len(windows))))
      if held_out >= len(windows):
        raise ChatDataError(f"{train_file}: {len(windows)} examples are too few to hold out "
                            f"{held_out} for evaluation; give an eval file.")
      eval_windows, eval_completion = windows[-held_out:], completion[-held_out:]
      windows, completion = windows[:-held_out], completion[:-held_out]
      eval_teacher = None if teacher is None else tuple(x[-held_out:] for x in teacher)
      teacher = None if teacher is None else tuple(x[:-held_out] for x in teacher)
    self._train = _Examples(windows, completion, train_file, teacher)
    self._eval = _Examples(eval_windows, eval_completion, eval_file or train_file, eval_teacher)
    self.spec = TextDatasetSpec(tfds_name=os.path.basename(train_file),
                                num_classes=tokenizer.vocab_size,
                                input_shape=(sequence_length,),
                                train_examples=self._train.num_examples)
    self._carve(validation_examples, train_file)

  def _carve(self, validation_examples: int, what: str) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    total = self._train.num_examples
    if not 0 <= validation_examples < total:
      raise ValueError(f"validation_examples={validation_examples} must be in [0, {total}) "
                       f"({what} has {total} training examples).")
    carve = np.random.default_rng(lm_pipeline._VALIDATION_SEED).permutation(total)  # pylint: disable=protected-access
    self._train_indices = np.sort(carve[:total - validation_examples])
    self._validation_indices = np.sort(carve[total - validation_examples:])
    self._order = (grain.MapDataset.range(len(self._train_indices))
                   .shuffle(seed=self.seed).repeat(None))
    self._teacher_logits = None

  def prompts(self, split: str, num: int, prompt_length: int, seed: int) -> np.ndarray:
    """[num, prompt_length] int32: the first tokens of `num` distinct examples of `split`
    ('eval' or 'validation'), drawn by `seed` (in the 'padded' layout with `prompt_length`
    equal to the pipeline's, each example's own prompt)."""
    windows, rows = self._split_rows(split)
    if not 1 <= prompt_length <= self.sequence_length:
      raise ValueError(f"prompt_length={prompt_length} must be in [1, sequence_length="
                       f"{self.sequence_length}].")
    if not 1 <= num <= len(rows):
      raise ValueError(f"num={num} prompts: split {split!r} has {len(rows)} examples; ask for "
                       f"1 to {len(rows)}.")
    chosen = np.random.default_rng(seed).choice(rows, size=num, replace=False)
    return windows.windows[chosen, :prompt_length].astype(np.int32)
