"""Bad input fails before any work, with a message naming the field, value and choices."""

import os

import pytest

from configs import quickstart
from conftest import run_python
from kdjax.train import ConfigError, run_suite, validate_config


def _config(**overrides):
  config = quickstart.get_config("smoke")
  for dotted, value in overrides.items():
    target = config
    *parents, leaf = dotted.split("__")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.mark.parametrize("overrides, message", [
    ({"method": "kdd"}, r"config.method='kdd' is not valid; valid values: dkd, kd, scratch"),
    ({"student__model": "resnet1000"},
     r"config.student.model='resnet1000' is not valid; valid values: .*cnn1d.*mlp"),
    ({"teacher__model": "vit"}, r"config.teacher.model='vit' is not valid"),
    ({"dataset": "mnist"}, r"config.dataset='mnist' is not valid; valid values: cifar10, "
                           r"cifar100, mnist1d"),
    ({"kd__temperature": 0.0}, r"config.kd.temperature must be a positive number, got 0.0"),
    ({"dkd__temperature": -1.0}, r"config.dkd.temperature must be a positive number"),
    ({"parallel": "pjit"}, r"config.parallel='pjit' is not valid; valid values: jit, pmap"),
    ({"num_steps": 0}, r"config.num_steps must be a positive integer, got 0"),
    ({"optimizer__name": "lion"}, r"config.optimizer.name='lion' is not valid"),
    ({"suite": "teacher,kdx"}, r"config.suite names run 'kdx'.*valid runs: teacher, dkd, kd"),
    ({"student__model": "resnet8x4"},
     r"config.student.model='resnet8x4' takes image32 inputs but dataset 'mnist1d' has "
     r"signal1d inputs; models for it: cnn1d, cnn1d_small, mlp"),
    ({"num_classes": 100}, r"config.num_classes=100 but dataset 'mnist1d' has 10 classes"),
    ({"teacher__checkpoint": "/nonexistent/ckpt"},
     r"config.teacher.checkpoint='/nonexistent/ckpt' does not exist"),
])
def test_bad_config_is_rejected_with_a_clear_message(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**overrides), num_devices=1)


def test_batch_not_divisible_by_device_count_names_both_numbers():
  with pytest.raises(ConfigError, match=r"config.global_batch_size=100 is not divisible by the "
                                        r"number of devices \(8\)"):
    validate_config(_config(global_batch_size=100), num_devices=8)


def test_missing_teacher_checkpoint_fails_before_training(tmp_path):
  config = _config(suite="scratch,kd")
  with pytest.raises(ConfigError, match=r"need a teacher, but there is no teacher checkpoint"):
    run_suite(config, str(tmp_path), num_devices=1)
  assert not os.path.exists(tmp_path / "scratch")  # Not even the scratch run started.


def test_cli_rejects_unknown_fields_and_bad_values(tmp_path):
  result = run_python(["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
                       f"--workdir={tmp_path}", "--config.kd.temprature=2"], check=False)
  assert result.returncode != 0 and "temprature" in result.stderr
  result = run_python(["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
                       f"--workdir={tmp_path}", "--config.method=fitnet"], check=False)
  assert result.returncode == 2
  assert "config.method='fitnet' is not valid; valid values: dkd, kd, scratch" in result.stderr
  assert not os.listdir(tmp_path)  # Nothing was written.


def test_unknown_quickstart_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match="valid: '' \\(full\\), 'smoke'"):
    quickstart.get_config("tiny")
