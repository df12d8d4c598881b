"""`kdjax.load_run` and experiments/export_model.py for a run whose student started from a
pretrained directory (model 'pretrained'): the architecture comes from
`config.student.pretrained`, the weights from the run's checkpoint."""

import os
import shutil

import jax
import numpy as np
import pytest

import kdjax
from configs import lm_pretrained
from kdjax.models.pretrained import directory as directory_lib
from kdjax.models.pretrained import tiny

# A whole (2-step) run in the fixture: about 15 s alone, a minute on a shared machine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step kd run: teacher 1 layer width 16 (vocab 384), student 1 layer width 8."""
  from kdjax.train.config_paths import resolve_config_paths  # pylint: disable=g-import-not-at-top
  from kdjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("pretrained_student")
  data = tiny.write_chat_jsonl(str(root / "data.jsonl"), 24)
  texts = tiny.texts_of(data)
  teacher = tiny.write_tiny_llama(str(root / "teacher"), texts, hidden_size=16, num_layers=1,
                                  max_positions=64)
  student = tiny.write_tiny_llama(str(root / "student"), texts, hidden_size=8, num_layers=1,
                                  max_positions=64, seed=1)
  config = lm_pretrained.get_config(f"teacher={teacher},student={student},data={data},smoke")
  config.method, config.suite, config.num_steps = "kd", "", 2
  config.lm.eval_prompts = 0
  run_dir = str(root / "run")
  train_and_evaluate(resolve_config_paths(config), run_dir, teacher_checkpoints=[teacher])
  return run_dir, student


def test_load_run_rebuilds_the_pretrained_student(trained):
  run_dir, student_dir = trained
  loaded = kdjax.load_run(run_dir)
  assert loaded.config.student.model == "pretrained"
  start = directory_lib.load_pretrained(student_dir)
  tokens = np.asarray(np.random.default_rng(0).integers(0, 384, (2, 7)), np.int32)
  output, _ = loaded.apply_fn(loaded.variables, tokens, train=False)
  # The same architecture as the directory's, with the trained weights (they moved).
  reference = start.module.apply(loaded.variables, tokens)
  np.testing.assert_allclose(output.logits, reference.logits, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(loaded.variables) == jax.tree.structure(start.variables)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       loaded.variables, start.variables)
  assert max(jax.tree.leaves(moved)) > 0


def test_export_model_writes_the_pretrained_student(trained, tmp_path):
  from experiments import export_model  # pylint: disable=g-import-not-at-top
  from kdjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  run_dir, _ = trained
  out = str(tmp_path / "student.msgpack")
  size = export_model.export_run(run_dir, out)
  assert size == os.path.getsize(out) > 0
  assert out.endswith(checkpoint.EXPORTED_SUFFIX)


def test_a_missing_student_directory_is_named(trained, tmp_path):
  from experiments import cli, export_model  # pylint: disable=g-import-not-at-top
  run_dir, student_dir = trained
  moved_dir = str(tmp_path / "moved")
  shutil.move(student_dir, moved_dir)
  try:
    with pytest.raises(FileNotFoundError, match=r"load_run: the run's student is model "
                                                r"'pretrained' built from "
                                                r"config.student.pretrained=") as error:
      kdjax.load_run(run_dir)
    assert student_dir in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(cli.UsageError, match=r"--run_dir=.*config.student.pretrained="):
      export_model.export_run(run_dir, str(tmp_path / "x.msgpack"))
  finally:
    shutil.move(moved_dir, student_dir)
