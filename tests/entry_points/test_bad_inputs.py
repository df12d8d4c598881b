"""Bad input of every kind fails before any work, with a message naming the field, the value
and what is allowed, and leaves every existing file of the workdir untouched."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from conftest import copy_runs, set_fields, snapshot
from kdjax import data, losses
from kdjax.train import (CheckpointError, ConfigChanged, ConfigError, NonFiniteLoss, run_suite,
                         train_and_evaluate)


def _config(data_dir, **overrides):
  config = quickstart.get_config("smoke")
  config.suite = "teacher,kd"
  config.data_dir = data_dir
  config.progress = False
  return set_fields(config, overrides, separator="__")


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory, smoke_suite):
  """A workdir holding a finished teacher + kd suite (the files that must survive): the runs
  of `_config` (smoke quickstart, suite teacher,kd), copied from conftest.smoke_suite."""
  return copy_runs(smoke_suite[0], tmp_path_factory.mktemp("finished"), ["teacher", "kd"])


BAD_CONFIGS = [
    ({"method": "kdd"}, r"config.method='kdd' is not valid \(did you mean 'kd'\?\); valid values: "
                        r".*dkd, .*kd, .*scratch"),
    ({"student__model": "resnet1000"},
     r"config.student.model='resnet1000' is not valid.*; valid values: .*cnn1d.*mlp"),
    ({"teacher__model": "vit"}, r"config.teacher.model='vit' is not valid"),
    ({"dataset": "mnist2d"}, r"config.dataset='mnist2d' is not valid.*; valid values: cifar10, "
                             r"cifar100, digits, imagenet2012, lm1b, mnist, mnist1d, pydoc, "
                             r"tiny_shakespeare"),
    ({"kd__temperature": 0.0}, r"config.kd.temperature must be a positive number, got 0.0"),
    ({"dkd__temperature": -1.0}, r"config.dkd.temperature must be a positive number"),
    ({"kd__ce_weight": -0.5}, r"config.kd.ce_weight must be a number >= 0, got -0.5"),
    ({"dkd__warmup_steps": -3}, r"config.dkd.warmup_steps must be a number >= 0"),
    ({"parallel": "pjit"}, r"config.parallel='pjit' is not valid.*; valid values: jit, jit_2d, "
                           r"jit_2d_fsdp, pmap"),
    ({"num_steps": 0}, r"config.num_steps must be a positive integer, got 0"),
    ({"log_every_steps": -1}, r"config.log_every_steps must be a positive integer"),
    ({"optimizer__name": "lion"}, r"config.optimizer.name='lion' is not valid.*; valid values: "
                                  r"adam, adamw, sgd"),
    ({"optimizer__schedule": "linear"}, r"config.optimizer.schedule='linear' is not valid"),
    ({"optimizer__learning_rate": -0.1}, r"config.optimizer.learning_rate must be a positive"),
    ({"on_nonfinite": "ignore"}, r"config.on_nonfinite='ignore' is not valid.*; valid values: "
                                 r"skip, stop"),
    ({"suite": "teacher,kdx"}, r"config.suite names run 'kdx'.*did you mean 'kd'.*valid runs: "
                               r"teacher, "),
    ({"student__model": "resnet8x4"},
     r"config.student.model='resnet8x4' takes image32 inputs but dataset 'mnist1d' has "
     r"signal1d inputs; models for it: cnn1d, cnn1d_small, mlp"),
    ({"num_classes": 100}, r"config.num_classes=100 but dataset 'mnist1d' has 10 classes"),
    ({"teacher__checkpoint": "/nonexistent/ckpt"},
     r"config.teacher.checkpoint='/nonexistent/ckpt' does not exist"),
    ({"device_batches": True, "parallel": "pmap"},
     r"config.device_batches=True: parallel 'pmap' takes per-device host batches \(valid: jit, "
     r"jit_2d, jit_2d_fsdp\); set config.device_batches=False\.$"),
    ({"steps_per_call": 10},
     r"config.steps_per_call=10 needs config.device_batches=True \(the batches of a call are "
     r"made inside it\); or set config.steps_per_call=1\.$"),
    ({"steps_per_call": 0}, r"config.steps_per_call must be a positive integer, got 0\.$"),
    ({"device_batches": True, "steps_per_call": 20},
     r"config.log_every_steps=10 is not a multiple of config.steps_per_call=20 \(the loop "
     r"logs, evaluates and saves between calls\); use a multiple of it\.$"),
    ({"device_batches": True, "suite": "teacher,cs_kd"},
     r"config.device_batches=True: sampler 'class_pairs' builds its batches on the host "
     r"\(valid: 'uniform'\); set config.device_batches=False. \(run 'cs_kd'\)"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS,
                         ids=[next(iter(o)) for o, _ in BAD_CONFIGS])
def test_bad_config_fails_before_work_and_keeps_the_workdir(overrides, message,
                                                            finished_workdir, data_dir):
  before = snapshot(finished_workdir)
  with pytest.raises(ConfigError, match=message):
    run_suite(_config(data_dir, **overrides), finished_workdir, num_devices=1)
  assert snapshot(finished_workdir) == before


@pytest.mark.parametrize("field", ["global_batch_size", "eval_batch_size"])
def test_batch_not_divisible_by_device_count_names_both_numbers(field, finished_workdir,
                                                                data_dir):
  before = snapshot(finished_workdir)
  with pytest.raises(ConfigError, match=rf"config.{field}=100 is not divisible by the number "
                                        r"of devices \(8\); use a multiple of 8"):
    run_suite(_config(data_dir, **{field: 100}), finished_workdir, num_devices=8)
  assert snapshot(finished_workdir) == before


def test_missing_teacher_checkpoint_fails_before_any_run(tmp_path, data_dir):
  with pytest.raises(ConfigError, match=r"Run 'kd' needs the teacher 'cnn1d', but there is no checkpoint at "):
    run_suite(_config(data_dir, suite="scratch,kd"), str(tmp_path), num_devices=1)
  assert not os.path.exists(tmp_path / "scratch")  # Not even the scratch run started.


def test_changed_config_into_existing_workdir_is_refused(finished_workdir, data_dir):
  before = snapshot(finished_workdir)
  with pytest.raises(ConfigChanged, match=r"Run 'kd' .* different config \(kd.temperature: "
                                          r"4.0 -> 2.0\).*allow_config_change"):
    run_suite(_config(data_dir, kd__temperature=2.0), finished_workdir, num_devices=1)
  assert snapshot(finished_workdir) == before


def test_allow_config_change_moves_the_old_run_aside(finished_workdir, tmp_path, data_dir):
  workdir = tmp_path / "w"
  shutil.copytree(finished_workdir, workdir)
  config = _config(data_dir, kd__temperature=2.0, allow_config_change=True)
  run_suite(config, str(workdir), num_devices=1)
  aside = [n for n in os.listdir(workdir) if n.startswith("kd.replaced-")]
  assert len(aside) == 1
  assert snapshot(workdir / aside[0]) == snapshot(os.path.join(finished_workdir, "kd"))


def test_teacher_checkpoint_of_another_model_is_refused(finished_workdir, tmp_path, data_dir):
  teacher = os.path.join(finished_workdir, "teacher", "checkpoints")
  config = _config(data_dir, suite="scratch,kd", teacher__model="cnn1d_small",
                   teacher__checkpoint=teacher)
  with pytest.raises(CheckpointError, match=r"is of model 'cnn1d', but the teacher is configured "
                                            r"as 'cnn1d_small' \(config.teacher.model"):
    run_suite(config, str(tmp_path), num_devices=1)
  assert not os.path.exists(tmp_path / "scratch")  # Refused before the first run.


def test_run_checkpoint_of_another_model_is_refused(finished_workdir, tmp_path, data_dir):
  run_dir = tmp_path / "kd"
  shutil.copytree(os.path.join(finished_workdir, "kd"), run_dir)
  for name in ("run_summary.json", "config.json"):
    os.remove(run_dir / name)
  before = snapshot(run_dir)
  config = _config(data_dir, method="kd", student__model="cnn1d_small")
  with pytest.raises(CheckpointError, match=r"was written with model='mlp', but this run has "
                                            r"model='cnn1d_small'"):
    train_and_evaluate(config, str(run_dir),
                       teacher_checkpoints=[os.path.join(finished_workdir, "teacher",
                                                        "checkpoints")])
  assert snapshot(run_dir) == before  # Refused, not mistaken for damage and moved aside.


def test_non_finite_loss_stops_with_step_and_metric(tmp_path, data_dir):
  config = _config(data_dir, method="scratch", suite="", optimizer__learning_rate=1e36)
  with pytest.raises(NonFiniteLoss, match=r"non-finite loss.* at step \d+ .*no checkpoint had "
                                          r"been written yet.*on_nonfinite='skip'"):
    train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "20")  # No NaN state was saved.


def test_non_finite_loss_can_be_skipped_and_counted(tmp_path, data_dir):
  config = _config(data_dir, method="scratch", suite="", optimizer__learning_rate=1e36,
                   on_nonfinite="skip")
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["skipped_nonfinite_steps"] > 0


def test_unknown_quickstart_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match="valid: '' \\(full\\), 'smoke'"):
    quickstart.get_config("tiny")


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError, match=r"tfds build cifar100 .*array_record"):
    data.InputPipeline("cifar100", global_batch_size=8, seed=0, data_dir=str(tmp_path))


LOGITS = jnp.zeros((2, 10))
BAD_LOSS_CALLS = [
    (lambda: losses.kd(LOGITS, jnp.zeros((2, 11))), ValueError,
     r"kd: .*vocabulary/class sizes differ: student V=10 teacher V=11"),
    (lambda: losses.kd(jnp.zeros((2, 10), jnp.int32), LOGITS), TypeError,
     r"kd: student_logits must have a floating dtype"),
    (lambda: losses.dkd(LOGITS, LOGITS, jnp.zeros((2,))), TypeError,
     r"dkd: labels must have an integer dtype"),
    (lambda: losses.dkd(LOGITS, LOGITS, np.array([0, 10])), ValueError,
     r"dkd: labels must lie in \[0, 10\)"),
    (lambda: losses.generalized_jsd(LOGITS, LOGITS, beta=1.5), ValueError,
     r"generalized_jsd: beta must lie in \[0.0, 1.0\], got 1.5"),
    (lambda: losses.skew_forward_kl(LOGITS, LOGITS, alpha=1.0), ValueError,
     r"skew_forward_kl: alpha must lie in \[0.0, 1.0\), got 1.0"),
    (lambda: losses.kd(LOGITS, LOGITS, temperature=0.0), ValueError,
     r"kd: temperature must be > 0, got 0.0"),
    (lambda: losses.kd(LOGITS, LOGITS, where=jnp.ones((3,))), ValueError,
     r"kd: where must have shape \(2,\)"),
    (lambda: losses.kd(jnp.zeros(()), jnp.zeros(())), ValueError, r"kd: .*rank >= 1"),
    (lambda: losses.dist(LOGITS, jnp.zeros((3, 10))), ValueError,
     r"dist: student_logits shape \(2, 10\) and teacher_logits shape \(3, 10\)"),
]


@pytest.mark.parametrize("call, error, message", BAD_LOSS_CALLS,
                         ids=[m[:24] for _, _, m in BAD_LOSS_CALLS])
def test_bad_loss_arguments_name_the_function_and_shapes(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_extra_teacher_without_checkpoint_or_run_is_refused(tmp_path, finished_workdir,
                                                            data_dir):
  config = _config(data_dir, suite="multi_teacher_kd", teacher__extra="cnn1d_small",
                   teacher__checkpoint=os.path.join(finished_workdir, "teacher", "checkpoints"))
  with pytest.raises(ConfigError, match=r"Run 'multi_teacher_kd' needs the teacher "
                                        r"'cnn1d_small'.*add 'teacher_1' to config.suite"):
    run_suite(config, str(tmp_path), num_devices=1)


def test_unknown_extra_teacher_model_lists_valid_models(data_dir):
  from kdjax.train import validate_config
  with pytest.raises(ConfigError, match=r"config.teacher.extra='convnext' is not valid.*; valid "
                                        r"values: .*cnn1d"):
    validate_config(_config(data_dir, teacher__extra="convnext"), num_devices=1)


def test_student_listed_before_its_teacher_is_refused(tmp_path, data_dir):
  with pytest.raises(ConfigError, match=r"runs 'kd' before its teacher run 'teacher'; list "
                                        r"'teacher' first"):
    run_suite(_config(data_dir, suite="kd,teacher"), str(tmp_path), num_devices=1)


def test_unfinished_teacher_run_is_not_used(finished_workdir, tmp_path, data_dir):
  workdir = tmp_path / "w"
  shutil.copytree(finished_workdir, workdir)
  os.remove(workdir / "teacher" / "run_summary.json")
  before = snapshot(str(workdir))
  with pytest.raises(ConfigError, match=r"needs the teacher run 'teacher', which has not "
                                        r"finished"):
    run_suite(_config(data_dir, suite="kd"), str(workdir), num_devices=1)
  assert snapshot(str(workdir)) == before
