"""Every experiment config validates, and the CIFAR-100 recipe is RepDistiller's."""

import glob
import importlib
import os

import numpy as np
import pytest

from conftest import REPO
from kdjax.train import validate_config
from kdjax.train import optimizer as optimizer_lib

CONFIGS = sorted(
    os.path.relpath(p, os.path.join(REPO, "configs"))[:-3].replace(os.sep, ".")
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
    if not os.path.basename(p).startswith(("_", "common", "protocol")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates(name, tmp_path):
  module = importlib.import_module(f"configs.{name}")
  if name == "lm_pretrained":  # Reads its directories: tiny random ones, written here.
    from kdjax.models.pretrained import tiny  # pylint: disable=g-import-not-at-top
    data = tiny.write_chat_jsonl(str(tmp_path / "data.jsonl"), 16)
    teacher = tiny.write_tiny_llama(str(tmp_path / "teacher"), tiny.texts_of(data),
                                    hidden_size=16, num_layers=1, max_positions=1024)
    config = module.get_config(f"teacher={teacher},student={teacher},data={data}")
  else:
    config = module.get_config()
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


# The anchors' settings, transcribed from megvii-research/mdistiller@a08d46f:
# mdistiller/engine/cfg.py (defaults), configs/cifar100/{kd,crd,fitnet,at,sp,rkd,pkt}.yaml and
# configs/cifar100/dkd/<pair>.yaml (SOLVER.LR and DKD.BETA per pair).
MDISTILLER_SOLVER = dict(BATCH_SIZE=64, EPOCHS=240, LR_DECAY_STAGES=[150, 180, 210],
                         LR_DECAY_RATE=0.1, WEIGHT_DECAY=0.0005, MOMENTUM=0.9)
MDISTILLER_DKD_PAIRS = {  # file: (teacher, student, LR, BETA)
    "res110_res32.yaml": ("resnet110", "resnet32", 0.05, 2.0),
    "res32x4_res8x4.yaml": ("resnet32x4", "resnet8x4", 0.05, 8.0),
    "res32x4_shuv1.yaml": ("resnet32x4", "ShuffleV1", 0.01, 8.0),
    "res32x4_shuv2.yaml": ("resnet32x4", "ShuffleV2", 0.01, 8.0),
    "res50_mv2.yaml": ("ResNet50", "MobileNetV2", 0.01, 8.0),
    "res56_res20.yaml": ("resnet56", "resnet20", 0.05, 2.0),
    "vgg13_mv2.yaml": ("vgg13", "MobileNetV2", 0.01, 6.0),
    "vgg13_vgg8.yaml": ("vgg13", "vgg8", 0.05, 6.0),
    "wrn40_2_shuv1.yaml": ("wrn_40_2", "ShuffleV1", 0.01, 8.0),
    "wrn40_2_wrn_16_2.yaml": ("wrn_40_2", "wrn_16_2", 0.05, 6.0),
    "wrn40_2_wrn_40_1.yaml": ("wrn_40_2", "wrn_40_1", 0.05, 6.0),
}
MDISTILLER_METHODS = {  # cfg.py: kdjax method -> {kdjax field: anchor value}
    "kd": dict(temperature=4, ce_weight=0.1, kd_weight=0.9),
    "dkd": dict(ce_weight=1.0, alpha=1.0, temperature=4.0),  # + WARMUP 20 epochs
    "crd": dict(feat_dim=128, ce_weight=1.0, feature_weight=0.8, nce_k=16384,
                nce_momentum=0.5, nce_t=0.07),
    "fitnet": dict(ce_weight=1.0, feature_weight=100.0),
    "at": dict(p=2, ce_weight=1.0, feature_weight=1000.0),
    "sp": dict(ce_weight=1.0, feature_weight=3000.0),
    "rkd": dict(distance_weight=25, angle_weight=50, ce_weight=1.0, feature_weight=1.0),
    "pkt": dict(ce_weight=1.0, feature_weight=30000.0),
}
_MDISTILLER_NAMES = {"ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2",
                     "MobileNetV2": "mobilenetv2", "ResNet50": "resnet50_cifar"}


@pytest.mark.parametrize("pair_file", sorted(MDISTILLER_DKD_PAIRS))
def test_cifar100_recipes_equal_the_anchor_configs(pair_file):
  from configs.cifar100 import distill, protocol
  teacher, student, lr, beta = MDISTILLER_DKD_PAIRS[pair_file]
  teacher, student = (_MDISTILLER_NAMES.get(n, n) for n in (teacher, student))
  for method, fields in MDISTILLER_METHODS.items():
    config = distill.get_config(f"teacher={teacher},student={student},method={method}")
    steps_per_epoch = 50_000 // MDISTILLER_SOLVER["BATCH_SIZE"]
    assert config.global_batch_size == MDISTILLER_SOLVER["BATCH_SIZE"]
    assert config.num_steps == MDISTILLER_SOLVER["EPOCHS"] * steps_per_epoch
    assert config.optimizer.learning_rate == lr
    assert config.optimizer.name == "sgd" and config.optimizer.schedule == "step"
    assert config.optimizer.momentum == MDISTILLER_SOLVER["MOMENTUM"]
    assert config.optimizer.weight_decay == MDISTILLER_SOLVER["WEIGHT_DECAY"]
    assert list(config.optimizer.decay_steps) == [
        e * steps_per_epoch for e in MDISTILLER_SOLVER["LR_DECAY_STAGES"]]
    assert config.optimizer.decay_factor == MDISTILLER_SOLVER["LR_DECAY_RATE"]
    assert config.method == method and config.suite == f"teacher,{method}"
    for field, value in fields.items():
      assert config[method][field] == value, (method, field)
    assert config.dkd.beta == beta and config.dkd.warmup_steps == 20 * steps_per_epoch
    assert (teacher, student) in distill.PUBLISHED and protocol.learning_rate(student) == lr


def test_cifar100_recipe_arguments_fail_naming_what_is_allowed():
  from configs.cifar100 import distill, teacher
  with pytest.raises(ValueError, match=r"Unknown pair teacher=vgg13,student=resnet20; the "
                                       r"anchors' pairs: teacher=resnet56,student=resnet20"):
    distill.get_config("teacher=vgg13,student=resnet20")
  with pytest.raises(ValueError, match=r"Unknown recipe argument 'studnet=vgg8'; arguments: "
                                       r"teacher=\.\.\., student=\.\.\., method=\.\.\."):
    distill.get_config("studnet=vgg8")
  with pytest.raises(ValueError, match=r"the anchors' teachers: resnet56, resnet110"):
    teacher.get_config("model=resnet8")
  assert distill.get_config("epochs=2").num_steps == 2 * 781


# megvii-research/mdistiller@a08d46f configs/imagenet/r34_r18/{kd,dkd,crd}.yaml.
MDISTILLER_IMAGENET = {
    "kd": dict(BATCH_SIZE=512, LR=0.2, fields=dict(temperature=1, ce_weight=0.5, kd_weight=0.5)),
    "dkd": dict(BATCH_SIZE=512, LR=0.2, fields=dict(ce_weight=1.0, beta=0.5, temperature=1.0)),
    "crd": dict(BATCH_SIZE=256, LR=0.1, fields=dict(ce_weight=1.0, feature_weight=0.8,
                                                    nce_k=16384, nce_momentum=0.5, nce_t=0.07)),
}


@pytest.mark.parametrize("method", sorted(MDISTILLER_IMAGENET))
def test_imagenet_recipe_equals_the_anchor_configs(method):
  from configs.imagenet import resnet34_resnet18 as recipe
  anchor = MDISTILLER_IMAGENET[method]
  config = recipe.get_config(f"method={method}")
  steps_per_epoch = 1_281_167 // anchor["BATCH_SIZE"]
  assert config.global_batch_size == anchor["BATCH_SIZE"]
  assert config.optimizer.learning_rate == anchor["LR"]
  assert config.num_steps == 100 * steps_per_epoch
  assert list(config.optimizer.decay_steps) == [e * steps_per_epoch for e in (30, 60, 90)]
  assert (config.optimizer.weight_decay, config.optimizer.momentum) == (1e-4, 0.9)
  for field, value in anchor["fields"].items():
    assert config[method][field] == value, field
  assert config.dkd.warmup_steps == steps_per_epoch  # WARMUP: 1 (epoch).
  assert (config.student.model, config.teacher.model) == ("resnet18", "resnet34")
  validate_config(config, num_devices=1)


def test_loading_configs_and_methods_does_not_start_jax():
  """`experiments.main` loads the config (importing every method) before
  `jax.distributed.initialize`, which must come before JAX's backend starts: no module may
  compute with jax.numpy at import (a multi-host run failed so)."""
  from conftest import run_python  # pylint: disable=g-import-not-at-top
  code = ("import glob, importlib.util\n"
          "import kdjax.methods, kdjax.models, kdjax.losses\n"
          "for path in sorted(glob.glob('configs/**/*.py', recursive=True)):\n"
          "  spec = importlib.util.spec_from_file_location('c', path)\n"
          "  module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
          "  getattr(module, 'get_config', lambda: None)()\n"
          "from jax._src import xla_bridge\n"
          "print('started' if xla_bridge._backends else 'not started')\n")
  result = run_python(["-c", code])
  assert result.stdout.strip().splitlines()[-1] == "not started", result.stdout
