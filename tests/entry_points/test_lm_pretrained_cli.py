"""`experiments.main` on configs/lm_pretrained.py: a pretrained (Hugging Face-format) teacher
directory teaches through `run_suite` with no teacher run, and a suite that lists one anyway is
refused in one line."""

import json
import os

import pytest

from conftest import REPO, run_python

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


def _main(models_dir, teacher, student, workdir, *overrides, check=True):
  """`experiments.main` on configs/lm_pretrained.py, run from the directory holding the models
  and the data, with relative paths, as a user would."""
  config = os.path.join(REPO, f"configs/lm_pretrained.py:teacher={teacher},student={student},"
                        "data=data.jsonl,smoke")
  return run_python(["-m", "experiments.main", f"--config={config}", f"--workdir={workdir}",
                     *overrides], cwd=str(models_dir), env_extra={"PYTHONPATH": REPO},
                    check=check)


def test_a_pretrained_teacher_distils_through_the_command_line(tiny_models):
  result = _main(tiny_models, "teacher", "student", "w")
  assert "Traceback" not in result.stderr
  summary = json.loads((tiny_models / "w" / "summary.json").read_text())
  assert set(summary["runs"]) == {"kd", "gkd"}
  for row in summary["runs"].values():
    assert row["steps"] == 4 and row["final_train_loss"] > 0
    assert row["provenance"].get("teachers") is None  # A directory, not a kdjax checkpoint.
    assert 0 <= row["spec_greedy_acceptance_rate"] <= 1  # Speculative decoding was measured.


def test_a_suite_with_a_teacher_run_and_a_pretrained_teacher_is_one_line(tiny_models):
  result = _main(tiny_models, "teacher", "student", "w2", "--config.suite=teacher,kd",
                 check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
  assert "remove 'teacher' from config.suite" in result.stderr
  assert not (tiny_models / "w2").exists()


def test_uld_distils_across_vocabulary_sizes_and_skips_speculative_decoding(tiny_models):
  _main(tiny_models, "teacher400", "student", "w3", "--config.suite=uld")
  row = json.loads((tiny_models / "w3" / "summary.json").read_text())["runs"]["uld"]
  assert row["steps"] == 4 and row["final_train_loss"] > 0
  assert "spec_greedy_acceptance_rate" not in row  # One vocabulary is needed to draft for the teacher.


def test_uld_across_tokenizers_reads_the_teachers_own_tokenization(tiny_models):
  _main(tiny_models, "teacher400", "student_own_tokenizer", "w4", "--config.suite=uld")
  with open(tiny_models / "w4" / "uld" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f if '"train"' in line]
  # Completions tokenized differently have different lengths: not every token aligns.
  assert all(0 < line["uld_aligned_fraction"] < 1 for line in lines), lines
