"""`experiments.main` on configs/lm_pretrained.py: a pretrained (Hugging Face-format) teacher
directory teaches through `run_suite` with no teacher run, and a suite that lists one anyway is
refused in one line."""

import json
import os

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  from kdjax.models.pretrained import tiny  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("pretrained")
  data = tiny.write_chat_jsonl(str(directory / "data.jsonl"), 48)
  texts = tiny.texts_of(data)
  tiny.write_tiny_llama(str(directory / "teacher"), texts, hidden_size=32, num_layers=2)
  tiny.write_tiny_llama(str(directory / "student"), texts, hidden_size=16, num_layers=1, seed=1)
  # Another vocabulary size, same tokenizer (as Qwen2.5-7B's 152064 rows to 0.5B's 151936).
  tiny.write_tiny_llama(str(directory / "teacher400"), texts, hidden_size=32, num_layers=2,
                        vocab_size=400)
  # A student with a tokenizer of its own (trained on other text, 300 tokens).
  tiny.write_tiny_llama(str(directory / "student_own_tokenizer"), texts, hidden_size=16,
                        num_layers=1, seed=1)
  tiny.train_tokenizer(texts[:len(texts) // 2], vocab_size=300).save(
      str(directory / "student_own_tokenizer" / "tokenizer.json"))
  return directory


def test_a_pretrained_teacher_distils_through_the_command_line(tiny_models):
  # Relative paths, run from the directory that holds them, as a user would.
  config = "configs/lm_pretrained.py:teacher=teacher,student=student,data=data.jsonl,smoke"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = run_python(["-m", "experiments.main", f"--config={os.path.join(repo, config)}",
                       "--workdir=w"], cwd=str(tiny_models),
                      env_extra={"PYTHONPATH": repo})
  assert "Traceback" not in result.stderr
  summary = json.loads((tiny_models / "w" / "summary.json").read_text())
  assert set(summary["runs"]) == {"kd", "gkd"}
  for row in summary["runs"].values():
    assert row["steps"] == 4 and row["final_train_loss"] > 0
    assert row["provenance"].get("teachers") is None  # A directory, not a kdjax checkpoint.
    assert 0 <= row["spec_greedy_acceptance_rate"] <= 1  # Speculative decoding was measured.


def test_a_suite_with_a_teacher_run_and_a_pretrained_teacher_is_one_line(tiny_models):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = os.path.join(repo, "configs/lm_pretrained.py:teacher=teacher,student=student,"
                        "data=data.jsonl,smoke")
  result = run_python(["-m", "experiments.main", f"--config={config}", "--workdir=w2",
                       "--config.suite=teacher,kd"], cwd=str(tiny_models),
                      env_extra={"PYTHONPATH": repo}, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
  assert "remove 'teacher' from config.suite" in result.stderr
  assert not (tiny_models / "w2").exists()


def test_uld_distils_across_vocabulary_sizes_and_skips_speculative_decoding(tiny_models):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = os.path.join(repo, "configs/lm_pretrained.py:teacher=teacher400,student=student,"
                        "data=data.jsonl,smoke")
  run_python(["-m", "experiments.main", f"--config={config}", "--workdir=w3",
              "--config.suite=uld"], cwd=str(tiny_models), env_extra={"PYTHONPATH": repo})
  row = json.loads((tiny_models / "w3" / "summary.json").read_text())["runs"]["uld"]
  assert row["steps"] == 4 and row["final_train_loss"] > 0
  assert "spec_greedy_acceptance_rate" not in row  # One vocabulary is needed to draft for the teacher.


def test_uld_across_tokenizers_reads_the_teachers_own_tokenization(tiny_models):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = os.path.join(repo, "configs/lm_pretrained.py:teacher=teacher400,"
                        "student=student_own_tokenizer,data=data.jsonl,smoke")
  run_python(["-m", "experiments.main", f"--config={config}", "--workdir=w4",
              "--config.suite=uld"], cwd=str(tiny_models), env_extra={"PYTHONPATH": repo})
  with open(tiny_models / "w4" / "uld" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f if '"train"' in line]
  # Completions tokenized differently have different lengths: not every token aligns.
  assert all(0 < line["uld_aligned_fraction"] < 1 for line in lines), lines
