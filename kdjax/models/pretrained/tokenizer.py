"""A checkpoint's tokenizer and chat template, without transformers.

`tokenizer.json` is read with the `tokenizers` library (the Rust tokenizer that transformers'
`PreTrainedTokenizerFast` wraps, so the ids are the same). The chat template comes from
`chat_template.jinja` (transformers 5's file) or `tokenizer_config.json`'s `chat_template`
(a string, or a list of named templates of which "default" is used), and is rendered by
`render_chat` in a sandboxed jinja2 environment set up as transformers' `apply_chat_template`
sets its own: `trim_blocks`, `lstrip_blocks`, the loop-controls extension, a `tojson` that
does not escape HTML, `raise_exception(message)` and `strftime_now(format)`, with the special
tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...) as variables.
"""

import datetime
import functools
import json
import os
from typing import Any, Dict, List, Optional

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                   "mask_token")


def load_tokenizer(directory: str):
  """The `tokenizers.Tokenizer` of `directory/tokenizer.json`, or None without that file."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.exists(path):
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.Tokenizer.from_file(path)


def tokenizer_config(directory: str) -> Dict[str, Any]:
  """`tokenizer_config.json` as a dict ({} without the file)."""
  path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def special_tokens(directory: str) -> Dict[str, str]:
  """`bos_token`, `eos_token`, ... as strings, from tokenizer_config.json."""
  config = tokenizer_config(directory)
  tokens = {}
  for name in _SPECIAL_TOKENS:
    value = config.get(name)
    if isinstance(value, dict):  # An AddedToken serialised as {"content": ..., ...}.
      value = value.get("content")
    if isinstance(value, str):
      tokens[name] = value
  return tokens


def load_chat_template(directory: str) -> Optional[str]:
  """The chat template of `directory` (see the module docstring), or None."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  template = tokenizer_config(directory).get("chat_template")
  if isinstance(template, list):
    named = {item.get("name"): item.get("template") for item in template}
    template = named.get("default")
  return template if isinstance(template, str) else None


def check_vocabulary(tokenizer, vocab_size: int, directory: str) -> None:
  """Refuses a tokenizer with ids the model has no row for (a smaller tokenizer is fine:
  checkpoints pad the embedding to a multiple of 64 or 128)."""
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(f"{os.path.join(directory, TOKENIZER_FILE)}: the tokenizer has {size} "
                     f"tokens but config.json's vocab_size is {vocab_size}; ids >= {vocab_size} "
                     "would have no embedding.")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  environment = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  environment.filters["tojson"] = tojson
  environment.globals["raise_exception"] = raise_exception
  environment.globals["strftime_now"] = (
      lambda fmt: datetime.datetime.now().strftime(fmt))
  return environment.from_string(template)


def render_chat(template: str, messages: List[Dict[str, Any]], add_generation_prompt: bool = False,
                **variables) -> str:
  """Renders a conversation with a chat template, as transformers' `apply_chat_template(...,
  tokenize=False)`.

  Args:
    template: the jinja template (`Pretrained.chat_template`).
    messages: `[{"role": "user" | "assistant" | "system", "content": str}, ...]`.
    add_generation_prompt: end with the header that starts the assistant's turn.
    **variables: more template variables, e.g. the special tokens (`special_tokens(dir)`).

  Returns:
    The rendered text (tokenize it with the checkpoint's tokenizer).
  """
  return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **variables)
