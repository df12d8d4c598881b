"""Faults caught before any work (non-finite numbers, an unfinished teacher, misnamed derived
fields, a config file that returns a dict) and stop signals in every phase of a command."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import SMOKE, copy_runs, set_fields
from fault_helpers import checkpoint_steps
from kdjax import signals

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _smoke_config(data_dir, **overrides):
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config("smoke")
  config.data_dir, config.progress = data_dir, False
  return set_fields(config, overrides)


def _plan_error(config) -> str:
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax.train.config_paths import resolve_config_paths  # pylint: disable=g-import-not-at-top
  with pytest.raises(train.ConfigError) as error:
    train.validate_config(resolve_config_paths(config), num_devices=1)
  return str(error.value)


# --- Non-finite numbers and misnamed fields: refused by validation, before the workdir. -----


@pytest.mark.parametrize("field, value", [
    ("kd.temperature", float("inf")), ("optimizer.learning_rate", float("nan")),
    ("optimizer.weight_decay", float("inf")), ("dkd.beta", -float("inf"))])
def test_non_finite_hyper_parameters_are_refused_naming_the_field(data_dir, field, value):
  message = _plan_error(_smoke_config(data_dir, **{field: value}))
  assert message.startswith(f"config.{field}=") and "finite" in message, message


def test_teacher_num_steps_is_named_as_itself(data_dir):
  message = _plan_error(_smoke_config(data_dir, **{"teacher.num_steps": -5}))
  assert message.startswith("config.teacher.num_steps must be"), message


def test_a_short_run_is_not_refused_for_a_field_derived_from_num_steps(data_dir):
  """The quickstart derives ctkd.curriculum_steps = num_steps // 24: 0 for 20 steps."""
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax.train.config_paths import resolve_config_paths  # pylint: disable=g-import-not-at-top
  config = _smoke_config(data_dir, num_steps=20, log_every_steps=10, eval_every_steps=20,
                         checkpoint_every_steps=20)
  assert config.ctkd.curriculum_steps == 0
  train.validate_config(resolve_config_paths(config), num_devices=1)


def test_non_finite_registered_inputs_are_refused_with_the_row():
  from kdjax import data  # pylint: disable=g-import-not-at-top
  inputs = np.zeros((6, 4), np.float32)
  bad = inputs.copy()
  bad[4, 2] = np.nan
  with pytest.raises(ValueError, match=r"eval inputs must be finite; 1 row\(s\).*row 4"):
    data.register_arrays("nan_eval_for_test", train=(inputs, np.zeros(6, int)),
                         eval=(bad, np.zeros(6, int)), num_classes=2, input_kind="signal1d")


def test_get_config_returning_a_dict_is_one_usage_error(tmp_path):
  from experiments import cli  # pylint: disable=g-import-not-at-top
  path = tmp_path / "plain.py"
  path.write_text("def get_config():\n  return {'method': 'kd'}\n")
  with pytest.raises(cli.UsageError, match="returned a dict, not an ml_collections.ConfigDict"):
    cli.load_config(str(path))


# --- An unfinished teacher is refused unless allowed. ---------------------------------------


def test_unfinished_teacher_checkpoint_is_refused_unless_allowed(smoke_suite, data_dir,
                                                                tmp_path):
  """A teacher run killed before its last step: its checkpoints/ hold only earlier steps."""
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax.train.config_paths import resolve_config_paths  # pylint: disable=g-import-not-at-top
  workdir = copy_runs(smoke_suite[0], tmp_path, ["teacher"])
  teacher = os.path.join(workdir, "teacher")
  steps = checkpoint_steps(teacher)
  assert len(steps) >= 2, steps
  shutil.rmtree(os.path.join(teacher, "checkpoints", str(steps[-1])))
  os.remove(os.path.join(teacher, "run_summary.json"))  # As a killed run leaves it.
  config = _smoke_config(data_dir, **{"teacher.checkpoint": os.path.join(teacher, "checkpoints"),
                                      "suite": "kd"})
  message = _plan_error(config)
  assert f"at step {steps[-2]} of its run's {steps[-1]}" in message, message
  assert "config.teacher.allow_unfinished=True" in message
  config.teacher.allow_unfinished = True
  train.validate_config(resolve_config_paths(config), num_devices=1)


# --- Stop signals. ---------------------------------------------------------------------------


def test_a_signal_outside_the_loop_raises_at_once_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(signals.Preempted) as error:
    with signals.handling_stop_signals():
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(10_000_000):  # The handler runs between two bytecodes.
        pass
  assert error.value.signal_name == "SIGTERM" and not error.value.work_started
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_in_a_deferred_block_is_a_flag_then_raised_at_its_end():
  reached = []
  with pytest.raises(signals.Preempted):
    with signals.handling_stop_signals():
      signals.mark_work_started()
      with signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received() == "SIGINT"  # Still running: the loop saves, then stops.
        reached.append(True)
  assert reached == [True]


def test_sigterm_as_a_suite_run_finishes_stops_the_suite_before_the_next(
    smoke_suite, data_dir, tmp_path, monkeypatch):
  """Issue 24: a SIGTERM that arrived as the teacher run finished was swallowed and the next
  run trained to the end (exit 0). Now the suite stops before `kd` starts; rerun, it runs."""
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax.train import suite as suite_lib  # pylint: disable=g-import-not-at-top
  workdir = copy_runs(smoke_suite[0], tmp_path / "w", ["teacher"])
  started = []
  original = suite_lib.train_checked_run

  def run_then_signal(plan, run_dir, **kwargs):
    started.append(kwargs["name"])
    if kwargs["name"] != "teacher":
      raise AssertionError("a run started after the stop signal")
    result = original(plan, run_dir, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return result

  monkeypatch.setattr(suite_lib, "train_checked_run", run_then_signal)
  config = _smoke_config(data_dir, suite="teacher,kd")
  with pytest.raises(train.Preempted) as error:
    train.run_suite(config, workdir, num_devices=1)
  assert started == ["teacher"] and error.value.work_started
  assert not os.path.exists(os.path.join(workdir, "kd", "checkpoints"))


def _start_main(args, data_dir):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable] + SMOKE + args + [f"--config.data_dir={data_dir}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.mark.parametrize("sig, code, words", [
    (signal.SIGINT, 130, "nothing was started"), (signal.SIGTERM, 75, "nothing was started")])
def test_a_signal_before_any_work_exits_130_for_ctrl_c_and_75_for_sigterm(
    sig, code, words, capsys, monkeypatch):
  """experiments.cli.run around a command that is stopped before its workdir is taken."""
  from experiments import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", ["command"])

  def main(argv):
    del argv
    os.kill(os.getpid(), sig)
    for _ in range(10_000_000):
      pass
    raise AssertionError("not stopped")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, config_name=None)
  assert exit_info.value.code == code
  err = capsys.readouterr().err
  assert err.strip() == f"received {signal.Signals(sig).name}: {words}.", err


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_during_dataset_generation_is_one_line(tmp_path, sig):
  """The dataset is generated as the first run starts: a stop there is one line, exit 75
  ("try again", a Ctrl-C too: work had started), and the interrupted generation leaves
  nothing a rerun would take for a prepared dataset."""
  code, words = 75, "rerun the same command to continue"
  from kdjax.data import catalog, sources  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "fresh_data")
  process = _start_main([f"--workdir={tmp_path / 'w'}"], data_dir)
  for line in process.stdout:  # Wait for the generation to start.
    if line.startswith("Generating"):
      break
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == code, (stdout, stderr)
  assert "Traceback" not in stdout + stderr, stderr
  lines = [line for line in stderr.splitlines() if line.strip() and "warn" not in line.lower()]
  assert len(lines) == 1 and f"received {signal.Signals(sig).name}" in lines[0], stderr
  assert words in lines[0]
  assert not os.path.exists(tmp_path / "w" / "teacher")
  # The same data_dir prepares cleanly afterwards.
  sources.ensure_prepared(catalog.get_dataset_spec("mnist1d"), data_dir)


# --- Memory: a run that cannot fit is refused before it allocates. ---------------------------


@pytest.mark.parametrize("field, value", [("global_batch_size", 10**9),
                                          ("eval_batch_size", 10**9)])
def test_a_run_that_cannot_fit_in_memory_is_refused_naming_the_field(data_dir, field, value):
  from kdjax.train import preflight  # pylint: disable=g-import-not-at-top
  from kdjax.validation import ConfigError  # pylint: disable=g-import-not-at-top
  config = _smoke_config(data_dir, **{field: value})
  with pytest.raises(ConfigError, match=f"lower config.{field}") as error:
    preflight.check_memory_fits(config, available=16 * 1024**3)
  assert "needs at least" in str(error.value) and "16.0 GiB are available" in str(error.value)


def test_the_memory_estimate_is_a_lower_bound_that_fits_the_smoke_run(data_dir):
  """The estimate counts what must be held (batches in flight: 160 bytes per MNIST-1D example
  each), and the smoke run fits a small machine."""
  from kdjax.train import preflight  # pylint: disable=g-import-not-at-top
  config = _smoke_config(data_dir)
  estimate = preflight.memory_estimate(config)
  assert estimate["batches"] == 40 * 4 * config.global_batch_size * (config.prefetch + 2)
  assert estimate["state"] > 0 and estimate["activations"] > 0
  preflight.check_memory_fits(config, available=1024**3)


def test_the_command_refuses_a_billion_example_batch_before_the_workdir(tmp_path, data_dir):
  from conftest import run_python  # pylint: disable=g-import-not-at-top
  result = run_python(SMOKE + [f"--workdir={tmp_path / 'w'}", f"--config.data_dir={data_dir}",
                               "--config.global_batch_size=1000000000"], check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.startswith("Error: This run needs at least")
  assert "lower config.global_batch_size" in result.stderr
  assert not (tmp_path / "w").exists()


def test_a_truncated_dataset_record_file_is_one_error_naming_the_dataset(data_dir, tmp_path):
  import glob  # pylint: disable=g-import-not-at-top
  from kdjax.data import catalog, sources  # pylint: disable=g-import-not-at-top
  from fault_helpers import truncate  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  (train_file,) = glob.glob(str(copy / "mnist1d" / "*" / "mnist1d-train.array_record*"))
  truncate(train_file, 0.5)
  spec = catalog.get_dataset_spec("mnist1d")
  with pytest.raises(sources.DatasetNotPreparedError, match=r"Dataset 'mnist1d' split 'train' "
                     r".* cannot be read .*delete it to generate it again"):
    sources.load_split(spec, "train", str(copy))
  shutil.rmtree(copy / "mnist1d")  # What the message says to do; then it reads again.
  assert len(sources.load_split(spec, "train", str(copy))) == spec.train_examples


def test_a_full_disk_while_generating_the_dataset_is_one_error(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  from kdjax.data import catalog, sources  # pylint: disable=g-import-not-at-top
  from kdjax.data import mnist1d_tfds  # pylint: disable=g-import-not-at-top

  def no_space(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(mnist1d_tfds.Mnist1d, "download_and_prepare", no_space)
  with pytest.raises(sources.DatasetNotPreparedError,
                     match="failed: No space left on device; free space there"):
    sources.ensure_prepared(catalog.get_dataset_spec("mnist1d"), str(tmp_path / "data"))
