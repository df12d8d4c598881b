"""Every experiment config validates, and the CIFAR-100 recipe is RepDistiller's."""

import glob
import importlib
import os

import numpy as np
import pytest

from conftest import REPO
from kdjax.train import validate_config
from kdjax.train import optimizer as optimizer_lib

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  validate_config(config, num_devices=1)


def test_cifar100_recipe_learning_rate_schedule():
  from configs import cifar100_resnet32x4_resnet8x4 as recipe
  config = recipe.get_config()
  steps_per_epoch = 781
  assert config.num_steps == 240 * steps_per_epoch
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_steps)
  for epoch, lr in [(0, 0.05), (149, 0.05), (150, 0.005), (180, 0.0005), (210, 0.00005),
                    (239, 0.00005)]:
    np.testing.assert_allclose(float(schedule(epoch * steps_per_epoch)), lr, rtol=1e-6)
  assert config.dkd.warmup_steps == 20 * steps_per_epoch
  assert (config.kd.ce_weight, config.kd.kd_weight, config.kd.temperature) == (0.1, 0.9, 4.0)


def test_cifar100_without_prepared_data_says_how_to_prepare(tmp_path):
  from configs import cifar100_resnet32x4_resnet8x4 as recipe
  from kdjax.data import DatasetNotPreparedError
  from kdjax.train import run_suite
  config = recipe.get_config("short")
  config.data_dir = str(tmp_path)
  with pytest.raises(DatasetNotPreparedError, match="tfds build cifar100"):
    run_suite(config, str(tmp_path / "work"), num_devices=1)
