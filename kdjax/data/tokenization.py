"""Tokenizers for language-model data: raw UTF-8 bytes, or byte-level BPE trained offline.

Both share one interface: `encode(str) -> list[int]`, `decode(ids) -> str` (special tokens
dropped, invalid UTF-8 replaced), `encode_batch(texts) -> list[np.ndarray]` (int32, for the
pipeline), and the attributes `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `name`.
`fingerprint(tokenizer)` tells two tokenizers apart: a teacher and a student can only be
distilled token by token when their fingerprints agree.
"""

import hashlib
import json
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

from kdjax import paths

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZERS = ("byte", "bpe")


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, then PAD=256, BOS=257, EOS=258 (vocab_size 259).

  No training, no files, no unknown tokens: any string round-trips exactly.
  """

  name = "byte"
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> List[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids), np.int64)
    return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", errors="replace")

  def canonical(self) -> str:
    """What `fingerprint` hashes: the whole definition of this tokenizer."""
    return json.dumps({"kind": "byte", "bytes": 256, "specials": list(SPECIAL_TOKENS)})


class BPETokenizer:
  """Byte-level BPE (GPT-2 style, Sennrich et al. 2016) from the `tokenizers` library.

  Ids 0, 1, 2 are PAD, BOS, EOS (the trainer puts special tokens first), then the 256 byte
  symbols, then one id per learned merge: `vocab_size` counts all of them. Byte-level means
  no unknown token: any string round-trips exactly.
  """

  name = "bpe"

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    if None in (self.pad_id, self.bos_id, self.eos_id):
      raise ValueError(f"The tokenizer lacks one of the special tokens {SPECIAL_TOKENS}.")

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
    """Trains on `texts` (the training split only) to exactly `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    minimum = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < minimum:
      raise ValueError(f"vocab_size={vocab_size!r} for a byte-level BPE tokenizer must be an "
                       f"integer >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        # Every byte is in the vocabulary even if the training text lacks it: no unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    trained = cls(tokenizer)
    if trained.vocab_size != vocab_size:
      raise ValueError(f"The training text allows only {trained.vocab_size} BPE tokens, fewer "
                       f"than vocab_size={vocab_size}; use a smaller vocab_size or more text.")
    return trained

  @classmethod
  def load(cls, directory: str) -> "BPETokenizer":
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE)))

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILE)
    self._tokenizer.save(path)
    return path

  def encode(self, text: str) -> List[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def canonical(self) -> str:
    """What `fingerprint` hashes: vocabulary, merges, special tokens and pre-tokenizer."""
    definition = json.loads(self._tokenizer.to_str())
    return json.dumps({
        "kind": "bpe",
        "vocab": definition["model"]["vocab"],
        "merges": definition["model"]["merges"],
        "added_tokens": [(t["id"], t["content"]) for t in definition["added_tokens"]],
        "pre_tokenizer": definition["pre_tokenizer"],
    }, sort_keys=True)


def train_or_load(directory: str, texts: Optional[Iterable[str]],
                  vocab_size: int) -> BPETokenizer:
  """The BPE tokenizer saved in `directory`, else one trained on `texts` and saved there.

  A saved tokenizer of another vocabulary size is refused rather than retrained over: a
  teacher trained with it would silently stop matching.
  """
  directory = paths.resolve(directory)
  path = os.path.join(directory, TOKENIZER_FILE)
  if os.path.exists(path):
    tokenizer = BPETokenizer.load(directory)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(f"The tokenizer saved in {path!r} has vocab_size={tokenizer.vocab_size}, "
                       f"not the requested {vocab_size}; pass vocab_size="
                       f"{tokenizer.vocab_size} or another tokenizer directory.")
    return tokenizer
  if texts is None:
    raise ValueError(f"No tokenizer in {directory!r} and no texts to train one on.")
  tokenizer = BPETokenizer.train(texts, vocab_size)
  tokenizer.save(directory)
  return tokenizer


def get_tokenizer(name: str, *, vocab_size: Optional[int] = None,
                  directory: Optional[str] = None, texts: Optional[Iterable[str]] = None):
  """A tokenizer by name: 'byte' (nothing else needed) or 'bpe' (`vocab_size`, `directory`
  where it is saved or will be, and the training `texts` when none is saved yet)."""
  if name == "byte":
    if vocab_size not in (None, ByteTokenizer.vocab_size):
      raise ValueError(f"vocab_size={vocab_size} with tokenizer 'byte', whose vocab_size is "
                       f"always {ByteTokenizer.vocab_size} (leave vocab_size unset).")
    return ByteTokenizer()
  if name == "bpe":
    if vocab_size is None or directory is None:
      raise ValueError("tokenizer 'bpe' needs vocab_size and a directory (tokenizer_dir) to "
                       f"save it in; got vocab_size={vocab_size!r}, directory={directory!r}.")
    return train_or_load(directory, texts, vocab_size)
  raise ValueError(f"Unknown tokenizer {name!r}; valid tokenizers: {', '.join(TOKENIZERS)}.")


def fingerprint(tokenizer) -> str:
  """sha256 hex digest of the tokenizer's full definition (vocabulary, merges, specials)."""
  return hashlib.sha256(tokenizer.canonical().encode("utf-8")).hexdigest()
