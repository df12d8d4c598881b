"""Tiny random-weight Llama-shaped directories and a chat JSONL file, for tests and smoke runs.

    write_chat_jsonl("data.jsonl", 64)
    write_tiny_llama("teacher", texts_of("data.jsonl"), hidden_size=64, num_layers=2)
    write_tiny_llama("student", texts_of("data.jsonl"), hidden_size=32, num_layers=1)

The tokenizer is a byte-level BPE (`tokenizers`) trained on the given texts with the chat
template's special tokens, so that every directory written from the same texts has the same
tokenizer and vocabulary; the chat template is a minimal ChatML.
"""

import json
import os
from typing import List, Sequence

import jax
import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIALS = ("<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>")


def write_chat_jsonl(path: str, num_rows: int, seed: int = 0) -> str:
  """`num_rows` rows of small arithmetic, alternately `prompt`/`completion` strings and
  `messages` (with a system turn every third row)."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(num_rows):
      a, b = (int(x) for x in rng.integers(0, 50, 2))
      question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
      if i % 2:
        row = {"prompt": question, "completion": answer}
      else:
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        if i % 3 == 0:
          messages.insert(0, {"role": "system", "content": "Answer briefly."})
        row = {"messages": messages}
      f.write(json.dumps(row) + "\n")
  return path


def texts_of(path: str) -> List[str]:
  """Every string of a chat JSONL file (to train the tokenizer on)."""
  texts = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      for value in row.values():
        texts += [value] if isinstance(value, str) else [m["content"] for m in value]
  return texts + ["system", "user", "assistant"]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 320):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tokenizer


def write_tiny_llama(directory: str, texts: Sequence[str], *, hidden_size: int,
                     num_layers: int, num_heads: int = 4, num_kv_heads: int = 2,
                     vocab_size: int = 384, max_positions: int = 256, seed: int = 0) -> str:
  """A random-weight Llama directory (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json with the chat template) that transformers and kdjax load."""
  from kdjax.models.pretrained.config import FULL, PretrainedConfig  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained.directory import save_pretrained  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained.families import build_module  # pylint: disable=g-import-not-at-top
  tokenizer = train_tokenizer(texts)
  config = PretrainedConfig(
      model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=2 * hidden_size, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
      max_position_embeddings=max_positions, norm_eps=1e-5, activation="silu",
      tie_embeddings=False, rope_theta=10000.0, layer_types=(FULL,) * num_layers,
      bos_token_id=tokenizer.token_to_id("<|bos|>"), eos_token_id=tokenizer.token_to_id("<|im_end|>"),
      pad_token_id=tokenizer.token_to_id("<|pad|>"))
  module = build_module(config)
  variables = module.init(jax.random.PRNGKey(seed), np.zeros((1, 4), np.int32))
  os.makedirs(directory, exist_ok=True)
  save_pretrained(directory, variables, config, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                  special_tokens={"bos_token": "<|bos|>", "eos_token": "<|im_end|>",
                                  "pad_token": "<|pad|>"})
  return directory
