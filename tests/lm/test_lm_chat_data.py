"""kdjax.data.chat_data: TRL's prompt-completion and conversational rows, the chat template's
render (against hand-written ChatML and jinja2 itself), completion-only masks, the padded and
packed layouts, and bad rows refused in one line naming the file and row."""

import json

import numpy as np
import pytest

from kdjax.data import chat_data
from kdjax.models.pretrained.tiny import CHAT_TEMPLATE

PAD, EOS = 0, 1


class CharTokenizer:
  """`tokenizers.Tokenizer`'s encode interface: one id per character (ord + 10)."""

  class _Encoding:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text, add_special_tokens=False):
    assert not add_special_tokens
    return self._Encoding([ord(c) + 10 for c in text])


def ids(text):
  return [ord(c) + 10 for c in text]


def _write_jsonl(path, rows, raw_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    for line in raw_lines:
      f.write(line + "\n")
  return str(path)


# --- Reading -------------------------------------------------------------------------------

def test_read_rows_skips_blank_lines(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}],
                      raw_lines=["", "  ", json.dumps({"prompt": "c", "completion": "d"})])
  assert [r["prompt"] for r in chat_data.read_rows(path)] == ["a", "c"]


@pytest.mark.parametrize("lines,match", [
    (["{\"prompt\": \"a\", "], r"d.jsonl:1: not a JSON object"),
    ([json.dumps({"prompt": "a", "completion": "b"}), "[1, 2]"],
     r"d.jsonl:2: a row must be a JSON object, got list"),
    ([""], r"d.jsonl: the file has no rows"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, lines, match):
  path = _write_jsonl(tmp_path / "d.jsonl", [], raw_lines=lines)
  with pytest.raises(chat_data.ChatDataError, match=match) as error:
    chat_data.read_rows(path)
  assert "\n" not in str(error.value)


def test_missing_and_unknown_files(tmp_path):
  with pytest.raises(chat_data.ChatDataError, match="no such data file"):
    chat_data.read_rows(str(tmp_path / "none.jsonl"))
  (tmp_path / "d.csv").write_text("prompt,completion\n")
  with pytest.raises(chat_data.ChatDataError, match="valid: .jsonl, .json, .parquet"):
    chat_data.read_rows(str(tmp_path / "d.csv"))


def test_parquet_rows(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}]), path)
  assert chat_data.read_rows(path) == [{"prompt": "a", "completion": "b"}]


# --- Rendering -----------------------------------------------------------------------------

CHATML_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
CHATML_FULL = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2+2?", "completion": "4"},  # standard, wrapped as user/assistant
    {"prompt": [{"role": "user", "content": "What is 2+2?"}],  # conversational
     "completion": [{"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]},
], ids=["prompt-completion", "conversational", "messages"])
def test_both_trl_formats_render_with_the_template(row):
  prompt, completion = chat_data.render_row(row, chat_template=CHAT_TEMPLATE)
  # The generation prompt is already the prompt's end: the completion is the rest of the
  # full render, here the assistant's content and its end of turn.
  assert prompt == CHATML_PROMPT
  assert prompt + completion == CHATML_FULL
  assert completion == "4<|im_end|>\n"


def test_render_equals_jinja_with_special_tokens_and_a_system_turn():
  jinja2 = pytest.importorskip("jinja2")
  template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
              "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
  special = {"bos_token": "<s>", "eos_token": "</s>"}
  prompt, completion = chat_data.render_row({"messages": messages}, chat_template=template,
                                            special_tokens=special)
  reference = jinja2.Template(template)
  want_prompt = reference.render(messages=messages[:-1], add_generation_prompt=True, **special)
  want_full = reference.render(messages=messages, add_generation_prompt=False, **special)
  assert prompt == want_prompt == "<s>[system] Be brief.</s>[user] Hi</s>[assistant] "
  # The completion is what the full render adds after the generation prompt.
  assert prompt + completion == want_full
  assert completion == "Hello</s>"


def test_without_a_template_strings_concatenate():
  assert chat_data.render_row({"prompt": "2+2=", "completion": "4"},
                              chat_template=None) == ("2+2=", "4")


@pytest.mark.parametrize("row,template,match", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     None, r"row 3: conversational rows need a chat template"),
    ({"messages": [{"role": "user", "content": "a"}]}, CHAT_TEMPLATE,
     r"row 3: 'messages' must be a list of messages ending with an assistant turn"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, CHAT_TEMPLATE,
     r"row 3: 'prompt' and 'completion' must both be strings or both lists"),
    ({"prompt": [{"role": "user"}], "completion": "b"}, CHAT_TEMPLATE,
     r"row 3: 'prompt': must be a string or a list of \{'role', 'content'\} messages"),
    ({"text": "a"}, CHAT_TEMPLATE,
     r"row 3: a row needs 'prompt' and 'completion', or 'messages'; got keys \['text'\]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "{% for m in messages %}{{ m['content'] }}{% endfor %}"
     "{% if add_generation_prompt %}>{% endif %}",
     r"row 3: the chat template's render of the whole conversation does not start with"),
])
def test_bad_rows_are_refused_in_one_line(row, template, match):
  with pytest.raises(chat_data.ChatDataError, match=match) as error:
    chat_data.render_row(row, chat_template=template, where="data.jsonl: row 3")
  assert "\n" not in str(error.value) and str(error.value).startswith("data.jsonl: row 3")


# --- Tokens, masks and layouts -------------------------------------------------------------

def test_tokenize_rows_splits_at_the_exact_boundary():
  rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "ef"}]
  plain = chat_data.tokenize_rows(rows, CharTokenizer(), chat_template=None, eos_id=EOS)
  assert [r.prompt.tolist() for r in plain] == [ids("ab"), ids("d")]
  assert [r.completion.tolist() for r in plain] == [ids("c") + [EOS], ids("ef") + [EOS]]
  templated = chat_data.tokenize_rows(rows[:1], CharTokenizer(), chat_template=CHAT_TEMPLATE,
                                      eos_id=EOS)
  # The template ends the turn itself: no EOS appended.
  assert templated[0].completion.tolist() == ids("c<|im_end|>\n")
  assert templated[0].prompt.tolist() == ids(
      "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n")


def test_empty_completion_is_refused():
  with pytest.raises(chat_data.ChatDataError, match="d.jsonl: row 2 has an empty completion"):
    chat_data.tokenize_rows([{"prompt": "a", "completion": "b"}, {"prompt": "a",
                                                                   "completion": ""}],
                            CharTokenizer(), chat_template=None, eos_id=None, where="d.jsonl")


def _rows():
  return [chat_data.TokenizedRow(np.array([11, 12, 13, 14], np.int32), np.array([21, 22], np.int32)),
          chat_data.TokenizedRow(np.array([15], np.int32), np.array([23, 24, 25, 26, 27], np.int32))]


def test_padded_layout_by_hand():
  windows, completion = chat_data.padded_examples(_rows(), sequence_length=6, prompt_length=3,
                                                  pad_id=PAD)
  # Prompts cut to their last 3 tokens and left-padded to 3; completions start at position 3,
  # cut to the window of T + 1 = 7 tokens, then PAD.
  np.testing.assert_array_equal(windows, [[12, 13, 14, 21, 22, PAD, PAD],
                                          [PAD, PAD, 15, 23, 24, 25, 26]])
  np.testing.assert_array_equal(completion, [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
  batch = chat_data._Examples(windows, completion, "d").gather(np.array([0, 1]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(batch["tokens"], windows[:, :-1])
  np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
  # The mask selects exactly the targets that are completion tokens: the first completion
  # token is predicted from the prompt's last token.
  np.testing.assert_array_equal(batch["mask"], [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
  assert batch["targets"][batch["mask"]].tolist() == [21, 22, 23, 24, 25, 26]


def test_packed_layout_by_hand():
  windows, completion = chat_data.packed_examples(_rows(), sequence_length=4, pad_id=PAD)
  stream = [11, 12, 13, 14, 21, 22, 15, 23, 24, 25, 26, 27]
  is_completion = [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1]
  width = 5
  assert windows.shape[1] == width
  flat = windows.reshape(-1)[:len(stream)].tolist()
  assert flat == stream[:len(flat)]
  np.testing.assert_array_equal(completion.reshape(-1)[:len(flat)], is_completion[:len(flat)])
  # Anything after the stream (the last window's padding) is PAD and not completion.
  assert not completion.reshape(-1)[len(stream):].any()
  assert (windows.reshape(-1)[len(stream):] == PAD).all()


def test_bad_prompt_length_and_layout():
  with pytest.raises(chat_data.ChatDataError, match=r"prompt_length=6 must be in \[1, "
                                                    r"sequence_length=6\)"):
    chat_data.padded_examples(_rows(), sequence_length=6, prompt_length=6, pad_id=PAD)
  with pytest.raises(chat_data.ChatDataError, match="layout='ragged'; valid: padded, packed"):
    chat_data.build_examples("unused.jsonl", None, sequence_length=6, layout="ragged",
                             prompt_length=3)


class PairTokenizer(CharTokenizer):
  """Another tokenizer: two ids per character, so the teacher's completions are longer."""

  def encode(self, text, add_special_tokens=False):
    return self._Encoding([i for c in text for i in (ord(c) + 10, 2)])


def _chat_tokenizer(tokenizer):
  return chat_data.ChatTokenizer(tokenizer, vocab_size=300, pad_id=PAD, bos_id=None,
                                 eos_id=EOS, chat_template=None, special_tokens={})


def test_two_tokenizers_give_the_teacher_its_own_rows(tmp_path):
  rows = [{"prompt": f"q{i}", "completion": "ab"[: 1 + i % 2]} for i in range(6)]
  path = _write_jsonl(tmp_path / "d.jsonl", rows)
  pipeline = chat_data.ChatInputPipeline(
      path, tokenizer=_chat_tokenizer(CharTokenizer()), global_batch_size=2, seed=0,
      sequence_length=8, prompt_length=3, teacher_tokenizer=_chat_tokenizer(PairTokenizer()))
  batch = pipeline.train_batch(0)
  assert batch[chat_data.TEACHER_TOKENS_KEY].shape == batch["tokens"].shape == (2, 8)
  for i, index in enumerate(batch["index"]):
    completion = rows[index]["completion"]
    student = batch["targets"][i][batch["mask"][i]].tolist()
    teacher_targets = np.concatenate([batch[chat_data.TEACHER_TOKENS_KEY][i, 1:],
                                      [PAD]])  # targets = tokens shifted by one
    teacher = teacher_targets[:-1][batch[chat_data.TEACHER_MASK_KEY][i, :-1]].tolist()
    assert student == ids(completion) + [EOS]
    # The teacher's completion targets, in its own tokenization (cut to the window).
    want = PairTokenizer().encode(completion).ids + [EOS]
    assert teacher == want[:len(teacher)] and len(teacher) >= len(student) - 1
  with pytest.raises(chat_data.ChatDataError, match="only 'padded' keeps rows apart"):
    chat_data.ChatInputPipeline(
        path, tokenizer=_chat_tokenizer(CharTokenizer()), global_batch_size=2, seed=0,
        sequence_length=8, layout="packed", teacher_tokenizer=_chat_tokenizer(PairTokenizer()))
