"""What kdjax writes and where: user paths, the workdir lock, file modes, a full disk, and
datasets whose labels do not fit."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import quickstart
from conftest import REPO
from kdjax import data, models, paths
from kdjax.data import catalog
from kdjax.train import WorkdirError, WorkdirLock, files, prepare_workdir, run_suite
from kdjax.train import train_and_evaluate
from kdjax.train.checkpoint import load_model_variables


def test_resolve_expands_home_and_makes_relative_paths_absolute(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("~/runs") == str(tmp_path / "home" / "runs")
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.resolve("/abs/x") == "/abs/x"
  assert paths.resolve("") == "" and paths.resolve(None) is None


def test_library_calls_take_relative_paths(monkeypatch, tmp_path, data_dir):
  """A notebook's `run_suite(config, 'runs/x')` with relative data_dir and checkpoints."""
  monkeypatch.chdir(tmp_path)
  config = quickstart.get_config("smoke")
  config.suite, config.progress = "teacher", False
  config.data_dir = os.path.relpath(data_dir, tmp_path)
  run_suite(config, "runs/lib", num_devices=1)
  config.suite, config.method = "", "kd"
  config.teacher.checkpoint = "runs/lib/teacher/checkpoints"
  summary = train_and_evaluate(config, "runs/kd",
                               teacher_checkpoints="runs/lib/teacher/checkpoints")
  assert 0 < summary["teacher_agreement"] <= 1
  assert os.path.exists(tmp_path / "runs" / "kd" / "run_summary.json")
  module = models.get_model("cnn1d", num_classes=10)
  expected = jax.eval_shape(lambda: models.init_variables(
      module, jax.random.PRNGKey(0), np.zeros((2, 40), np.float32)))
  variables = load_model_variables("runs/lib/teacher/checkpoints", expected, model_name="cnn1d")
  assert set(variables) >= {"params"}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_are_as_readable_as_the_umask_allows(tmp_path, umask, mode):
  previous = os.umask(umask)
  try:
    files.write_json_atomic(str(tmp_path / "summary.json"), {"a": 1})
  finally:
    os.umask(previous)
  assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == mode
  assert files.read_json(str(tmp_path / "summary.json")) == {"a": 1}
  assert os.listdir(tmp_path) == ["summary.json"]  # No temporary file left behind.


def test_workdir_lock_refuses_a_second_holder_and_is_released(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=rf"is in use by process {os.getpid()} on "):
      with WorkdirLock(str(tmp_path)):
        pass
    with WorkdirLock(str(tmp_path), enabled=False):  # Processes 1.. of a multi-host run.
      pass
  with WorkdirLock(str(tmp_path)):  # Released on exit.
    pass


def test_prepare_workdir_creates_relative_and_refuses_a_file(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert prepare_workdir("runs/new") == str(tmp_path / "runs" / "new")
  assert os.listdir(tmp_path / "runs" / "new") == []  # The write probe is gone.
  (tmp_path / "f").write_text("")
  with pytest.raises(WorkdirError, match="is a file, not a directory"):
    prepare_workdir("f")


class BadLabels(tfds.core.GeneratorBasedBuilder):
  """Eight 40-sample signals; record 5 carries label 12 although the dataset has 10 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "signal": tfds.features.Tensor(shape=(40,), dtype=np.float32),
        "label": tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      yield i, {"signal": np.zeros(40, np.float32), "label": 12 if i == 5 else i}


def test_labels_outside_the_classes_are_refused_when_the_dataset_opens(monkeypatch, tmp_path):
  monkeypatch.setitem(catalog.DATASETS, "bad_labels", catalog.DatasetSpec(
      tfds_name="bad_labels", input_key="signal", label_key="label", num_classes=10,
      input_shape=(40,), input_kind="signal1d", local_builder=lambda: BadLabels))
  with pytest.raises(data.InvalidLabelsError, match=r"'bad_labels' split 'train': 1 of 8 labels lie "
                                                    r"outside \[0, 10\) .*has label 12"):
    data.InputPipeline("bad_labels", global_batch_size=4, seed=0, data_dir=str(tmp_path))


_DISK_FULL_SCRIPT = textwrap.dedent("""
    set -u
    mount -t tmpfs -o size=448k tmpfs "$WORK" || exit 99
    run() {{ {python} -m experiments.main --config=configs/quickstart.py:smoke \\
        --config.suite=teacher --workdir="$WORK/w" --config.data_dir="$DATA"; }}
    run > "$OUT/out1" 2> "$OUT/err1"; echo $? > "$OUT/rc1"
    ls "$WORK/w/teacher/checkpoints" > "$OUT/kept"
    mount -o remount,size=16m "$WORK"   # Space is freed.
    run > "$OUT/out2" 2> "$OUT/err2"; echo $? > "$OUT/rc2"
""")


@pytest.mark.slow
def test_full_disk_ends_in_one_line_keeps_the_last_checkpoint_and_the_rerun_continues(
    tmp_path, data_dir):
  """A 448 KiB tmpfs holds two checkpoints of the smoke teacher (~170 KiB each) but not the
  third; mounted in a private user+mount namespace, so no root is needed where user
  namespaces are enabled."""
  if subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
    pytest.skip("needs `unshare -Urm` (user namespaces) to mount a small tmpfs")
  work, out = tmp_path / "mnt", tmp_path / "out"
  work.mkdir()
  out.mkdir()
  script = _DISK_FULL_SCRIPT.format(python=sys.executable)
  env = dict(os.environ, WORK=str(work), OUT=str(out), DATA=data_dir, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["unshare", "-Urm", "bash", "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  read = lambda name: (out / name).read_text()
  assert read("rc1").strip() == "1", read("err1")[-3000:]
  [line] = [l for l in read("err1").splitlines() if l.strip()]
  assert line.startswith("Error: No space left on device while writing "
                         f"{work}/w/teacher/checkpoints/"), line
  kept = [int(n) for n in read("kept").split() if n.isdigit()]
  assert kept and f"the last good checkpoint (step {max(kept)}) is kept" in line
  assert read("rc2").strip() == "0", read("err2")[-3000:]
  assert f"[teacher] resumed from step {max(kept)}" in read("out2")
