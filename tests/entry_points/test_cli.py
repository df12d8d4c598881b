"""The command line as a user meets it: every mistake is one line `Error: ...`, exit status 2,
no traceback, the offending name in the line, and the workdir untouched; --help exits 0;
relative and `~` paths work; a live run's workdir is refused to a second run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_python, snapshot

MAIN = ["-m", "experiments.main"]
SMOKE = "--config=configs/quickstart.py:smoke"


def _assert_one_line_error(result, *names):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("Error: "), lines[0]
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]


# (arguments after --workdir, names the error line must contain)
MISTAKES = {
    "unknown_top_level_field": ([SMOKE, "--config.no_such_field=1"],
                                ["no_such_field", "Fields of config: "]),
    "unknown_method_field": ([SMOKE, "--config.kd.temprature=2"],
                             ["temprature", "did you mean 'temperature'"]),
    "unknown_optimizer_field": ([SMOKE, "--config.optimizer.learning_rat=0.1"],
                                ["learning_rat", "did you mean 'learning_rate'"]),
    "unknown_nested_group": ([SMOKE, "--config.studnet.model=mlp"],
                             ["studnet", "did you mean 'student'"]),
    "field_below_a_value": ([SMOKE, "--config.num_steps.max=1"], ["config.num_steps"]),
    "group_given_a_value": ([SMOKE, "--config.kd=3"], ["config.kd is a group"]),
    "misspelled_method": ([SMOKE, "--config.method=kdd"],
                          ["config.method='kdd'", "did you mean 'kd'", "valid values: "]),
    "misspelled_student_model": ([SMOKE, "--config.student.model=mpl"],
                                 ["'mpl'", "did you mean 'mlp'"]),
    "misspelled_teacher_model": ([SMOKE, "--config.teacher.model=cnn1", "--config.suite=teacher"],
                                 ["config.teacher.model='cnn1'", "did you mean 'cnn1d'"]),
    "misspelled_suite_run": ([SMOKE, "--config.suite=teacher,kdd"], ["'kdd'", "did you mean"]),
    "missing_config_file": (["--config=configs/quickstrt.py"],
                            ["configs/quickstrt.py", "did you mean 'configs/quickstart.py'"]),
    "config_file_is_a_directory": (["--config=configs"], ["no such config file 'configs'"]),
    "bad_variant": (["--config=configs/quickstart.py:tiny"], ["'tiny'", "smoke"]),
    "int_given_text": ([SMOKE, "--config.num_steps=abc"], ["config.num_steps", "an integer"]),
    "float_given_text": ([SMOKE, "--config.kd.temperature=hot"],
                         ["config.kd.temperature", "a number"]),
    "bool_given_text": ([SMOKE, "--config.progress=maybe"], ["config.progress", "True or False"]),
    "zero_steps": ([SMOKE, "--config.num_steps=0"], ["config.num_steps", "positive", "got 0"]),
    "negative_batch": ([SMOKE, "--config.global_batch_size=-8"],
                       ["config.global_batch_size", "got -8"]),
    "negative_temperature": ([SMOKE, "--config.kd.temperature=-1"], ["config.kd.temperature"]),
    "unknown_parallel": ([SMOKE, "--config.parallel=pjit"],
                         ["'pjit'", "jit, jit_2d, jit_2d_fsdp, pmap"]),
    "unknown_flag": ([SMOKE, "--wrkdir=x"], ["wrkdir", "workdir"]),
    "missing_teacher_checkpoint": ([SMOKE, "--config.suite=", "--config.method=kd",
                                    "--config.teacher.checkpoint=runs/none/checkpoints"],
                                   ["runs/none/checkpoints", "does not exist"]),
}


@pytest.fixture(scope="module")
def mistake_results(tmp_path_factory):
  """Each mistake run once, as `python -m experiments.main` in a child forked from one process
  that imported jax and kdjax once (tests/entry_points/forked_main.py): 20+ fresh processes spent a minute
  importing. Fresh processes still check the one-line errors below (missing workdir, broken
  config file, unwritable workdir), and the forking process must print nothing itself."""
  workdirs, befores, cases = {}, {}, {}
  for case, (args, _) in MISTAKES.items():
    workdir = tmp_path_factory.mktemp(case) / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine\n")
    workdirs[case], befores[case] = workdir, snapshot(workdir)
    cases[case] = [f"--workdir={workdir}"] + args
  files = tmp_path_factory.mktemp("forked")
  (files / "cases.json").write_text(json.dumps(cases))
  forked = run_python([os.path.join(REPO, "tests", "entry_points", "forked_main.py"), str(files / "cases.json"),
                       str(files / "results.json")])
  assert forked.stdout == forked.stderr == "", forked.stderr[-3000:]  # No import-time noise.
  results = json.loads((files / "results.json").read_text())
  return {case: (subprocess.CompletedProcess(cases[case], **results[case]), befores[case],
                 workdirs[case]) for case in MISTAKES}


@pytest.mark.parametrize("case", MISTAKES)
def test_mistake_is_one_line_with_status_2_and_the_workdir_unchanged(case, mistake_results):
  result, before, workdir = mistake_results[case]
  _assert_one_line_error(result, *MISTAKES[case][1])
  assert snapshot(workdir) == before
  assert sorted(os.listdir(workdir.parent)) == ["work"]  # Nothing written beside it either.


def test_broken_config_file_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  result = run_python(MAIN + [f"--workdir={tmp_path / 'w'}", f"--config={broken}"], check=False)
  _assert_one_line_error(result, str(broken), "SyntaxError")
  assert sorted(os.listdir(tmp_path)) == ["broken.py"]


@pytest.mark.parametrize("kind", ["a_file", "under_a_file", "not_creatable"])
def test_workdir_that_cannot_be_written_is_one_line_and_creates_nothing(kind, tmp_path):
  regular_file = tmp_path / "file"
  regular_file.write_text("x")
  # Under /proc nothing can be created, even by root (CI runs as root: chmod would not do).
  target = {"a_file": regular_file, "under_a_file": regular_file / "runs",
            "not_creatable": "/proc/kdjax-test-workdir"}[kind]
  result = run_python(MAIN + [SMOKE, f"--workdir={target}"], check=False)
  _assert_one_line_error(result, str(target))
  assert regular_file.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def test_missing_workdir_is_one_line():
  result = run_python(MAIN + [SMOKE], check=False)
  _assert_one_line_error(result, "--workdir")


def test_help_exits_0_and_lists_every_config_field_with_its_default():
  result = run_python(MAIN + [SMOKE, "--help"])
  assert "--workdir" in result.stdout
  assert "--config.kd.temperature=4.0" in result.stdout
  assert "--config.num_steps=40" in result.stdout  # The smoke variant's own value.
  plain = run_python(MAIN + ["--help"])
  assert "--config=FILE" in plain.stdout and "configs/quickstart.py" in plain.stdout


@pytest.mark.slow  # Trains a teacher; README's own commands (also slow) cover relative paths too.
def test_relative_teacher_checkpoint_and_tilde_workdir(tmp_path, data_dir):
  """README's second "any config" command: a relative checkpoint, here with a `~` workdir
  and a `~` data_dir, from a directory that is not the repository."""
  home = os.path.dirname(data_dir)
  env = {"HOME": home}
  common = [f"--config={REPO}/configs/quickstart.py:smoke", f"--config.data_dir=~/{os.path.basename(data_dir)}"]
  run_python(MAIN + common + ["--workdir=~/qs", "--config.suite=teacher"], cwd=home,
             env_extra=env)
  assert os.path.isdir(os.path.join(home, "qs", "teacher", "checkpoints"))
  result = run_python(MAIN + common + ["--workdir=runs/one", "--config.suite=",
                                       "--config.method=jsd",
                                       "--config.teacher.checkpoint=qs/teacher/checkpoints"],
                      cwd=home, env_extra=env)
  assert "| jsd | jsd | mlp |" in result.stdout
  assert os.path.exists(os.path.join(home, "runs", "one", "summary.json"))
  assert not os.path.exists(os.path.join(home, "~"))  # No literal '~' directory.
  # The persistent compilation cache defaults to ~/.cache/kdjax/jax (programs compiled > 1 s).
  cached = os.listdir(os.path.join(home, ".cache", "kdjax", "jax"))
  assert any(name.endswith("-cache") for name in cached), cached


def test_second_run_on_a_live_workdir_is_refused_and_a_killed_run_does_not_block(
    tmp_path, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  long_run = [sys.executable] + MAIN + [
      SMOKE, f"--workdir={tmp_path}", f"--config.data_dir={data_dir}", "--config.suite=teacher",
      "--config.teacher.num_steps=1000000"]
  first = subprocess.Popen(long_run, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    line = first.stdout.readline()
    if line.startswith("[1/1] teacher ("):  # The suite's own progress line comes first.
      line = first.stdout.readline()
    assert "[teacher] step" in line  # Training: the lock is held.
    second = run_python(MAIN + [SMOKE, f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
                                "--config.suite=teacher", "--config.teacher.num_steps=1000000"],
                        check=False)
    line = _assert_one_line_error(second, str(tmp_path), f"process {first.pid} ", "in use")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  from kdjax.train import WorkdirLock
  with WorkdirLock(str(tmp_path)):  # The killed run's lock is gone with its process.
    pass
  assert "--workdir" in line
