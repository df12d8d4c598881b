"""PyTorch import of the ResNet families and the `experiments.import_teacher` command.

The slow tests build the PyTorch definitions of tests/models/torch_resnets.py (RepDistiller's
and torchvision's module names) with random weights and BatchNorm statistics, convert their
state_dicts and compare eval-mode logits; the fast ones check the importer's error messages.
"""

import os

import numpy as np
import pytest
from conftest import run_python

from experiments import cli, import_teacher

_CIFAR_MODELS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                 "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1",
                 "wrn_40_2", "resnet50_cifar"]


# --- importer mistakes (no torch) ---------------------------------------------------------


def test_unknown_model_lists_the_importable_ones(tmp_path):
  with pytest.raises(cli.UsageError, match=r"--model=resnet32x5: unknown model.*did you mean "
                                           r"'resnet32x4'.*Models with one: .*wrn_40_2"):
    import_teacher.import_teacher("resnet32x5", "x.pth", num_classes=100,
                                  out=str(tmp_path / "out"))


def test_missing_pth_names_the_resolved_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(cli.UsageError, match=f"--pth={tmp_path}/teachers/missing.pth: no such file"):
    import_teacher.import_teacher("resnet8", "teachers/missing.pth", num_classes=100, out="out")


def test_out_that_holds_files_is_refused(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("a trained model")
  with pytest.raises(cli.UsageError, match="--out=.*/out: exists and is not an empty directory"):
    import_teacher.import_teacher("resnet8", str(tmp_path / "x.pth"), num_classes=100,
                                  out=str(tmp_path / "out"))
  with pytest.raises(cli.UsageError, match="--num_classes=0: must be at least 1"):
    import_teacher.import_teacher("resnet8", "x.pth", num_classes=0, out=str(tmp_path / "new"))


def test_command_line_mistake_is_one_line_and_status_2(tmp_path):
  result = run_python(["-m", "experiments.import_teacher", "--model=resnet8", "--pth=a.pth",
                       "--out=out"], check=False, cwd=str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
  assert result.stderr.startswith("Error: --num_classes")


# --- conversions (torch) ------------------------------------------------------------------


def _torch_and_state_dict(name, num_classes, seed=0):
  import torch_resnets  # pylint: disable=g-import-not-at-top  (imports torch)
  model = torch_resnets.randomize(torch_resnets.build(name, num_classes), seed)
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def _kdjax_logits(name, variables, inputs_nchw, num_classes):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  module = models.get_model(name, num_classes=num_classes)
  output, _ = models.apply_fn(module)(variables, jnp.asarray(inputs_nchw.transpose(0, 2, 3, 1)),
                                      train=False)
  return np.asarray(output.logits)


def _torch_logits(model, inputs_nchw):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(inputs_nchw)).numpy()


@pytest.mark.slow
def test_torch_parameter_counts_equal_kdjax_counts():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch_resnets  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  from test_resnets_models import EXPECTED_PARAMETERS  # pylint: disable=g-import-not-at-top
  assert sorted(torch_resnets.NAMES) == sorted(EXPECTED_PARAMETERS)
  for name in torch_resnets.NAMES:
    num_classes, expected = EXPECTED_PARAMETERS[name]
    torch_count = sum(p.numel() for p in torch_resnets.build(name, num_classes).parameters())
    module = models.get_model(name, num_classes=num_classes)
    variables = jax.eval_shape(lambda m=module: models.init_variables(
        m, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert torch_count == models.count_params(variables["params"]) == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("name", _CIFAR_MODELS)
def test_converted_cifar_model_gives_the_pytorch_logits(name):
  from kdjax.models import torch_import  # pylint: disable=g-import-not-at-top
  model, state_dict = _torch_and_state_dict(name, 10)
  inputs = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  variables = torch_import.convert_state_dict(name, state_dict, num_classes=10)
  # The BatchNorm statistics are random, so a mean/var mix-up would show in the logits.
  assert not np.allclose(variables["batch_stats"]["stage1_block0"]["bn1"]["mean"], 0)
  expected = _torch_logits(model, inputs)
  np.testing.assert_allclose(_kdjax_logits(name, variables, inputs, 10), expected,
                             rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_converted_resnet18_gives_the_pytorch_logits_at_224():
  """The 7x7/2 stem conv and the 3x3/2 max pool pad like PyTorch (Flax 'SAME' would not)."""
  from kdjax.models import torch_import  # pylint: disable=g-import-not-at-top
  model, state_dict = _torch_and_state_dict("resnet18", 1000)
  inputs = np.random.default_rng(2).normal(size=(1, 3, 224, 224)).astype(np.float32)
  variables = torch_import.convert_state_dict("resnet18", state_dict, num_classes=1000,
                                              input_shape=(224, 224, 3))
  expected = _torch_logits(model, inputs)
  np.testing.assert_allclose(_kdjax_logits("resnet18", variables, inputs, 1000), expected,
                             rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_imagenet_state_dicts_convert(name):
  from kdjax.models import torch_import  # pylint: disable=g-import-not-at-top
  _, state_dict = _torch_and_state_dict(name, 1000)
  variables = torch_import.convert_state_dict(name, state_dict, num_classes=1000,
                                              input_shape=(224, 224, 3))
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.slow
def test_wrong_architecture_or_classes_is_one_error_naming_the_tensors(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  _, state_dict = _torch_and_state_dict("resnet8", 100)
  path = str(tmp_path / "resnet8.pth")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  with pytest.raises(cli.UsageError, match=r"is not a resnet8x4 with --num_classes=100: .*"
                                           r"(stem_conv|downsample|missing)"):
    import_teacher.import_teacher("resnet8x4", path, num_classes=100, out=str(tmp_path / "a"))
  with pytest.raises(cli.UsageError, match=r"is not a wrn_16_1 .*no tensor 'block1"):
    import_teacher.import_teacher("wrn_16_1", path, num_classes=100, out=str(tmp_path / "b"))
  with pytest.raises(cli.UsageError, match=r"is not a resnet8 with --num_classes=10: .*head"):
    import_teacher.import_teacher("resnet8", path, num_classes=10, out=str(tmp_path / "c"))
  torch.save([1, 2], str(tmp_path / "list.pth"))
  with pytest.raises(cli.UsageError, match=r"holds a list, not a state_dict"):
    import_teacher.import_teacher("resnet8", str(tmp_path / "list.pth"), num_classes=100,
                                  out=str(tmp_path / "d"))
  assert not any(os.path.exists(tmp_path / d) for d in "abcd")


@pytest.mark.slow
def test_import_teacher_command_writes_a_teacher_checkpoint(tmp_path):
  """RepDistiller's {'model': state_dict} .pth, given by a path relative to the working
  directory, loads back with `load_model_variables` and gives the PyTorch logits."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  from kdjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  model, _ = _torch_and_state_dict("resnet8x4", 100, seed=3)
  (tmp_path / "downloads").mkdir()
  torch.save({"epoch": 240, "model": model.state_dict(), "best_acc": torch.tensor(79.4)},
             str(tmp_path / "downloads" / "ckpt.pth"))
  result = run_python(["-m", "experiments.import_teacher", "--model=resnet8x4",
                       "--pth=downloads/ckpt.pth", "--num_classes=100", "--out=teachers/r8x4"],
                      cwd=str(tmp_path))
  out = str(tmp_path / "teachers" / "r8x4")
  assert f"--config.teacher.checkpoint={out}" in result.stdout
  assert checkpoint.saved_model_name(out) == "resnet8x4"
  module = models.get_model("resnet8x4", num_classes=100)
  expected_shapes = jax.eval_shape(lambda: models.init_variables(
      module, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  variables = checkpoint.load_model_variables(out, expected_shapes, model_name="resnet8x4")
  inputs = np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32)
  expected = _torch_logits(model, inputs)
  np.testing.assert_allclose(_kdjax_logits("resnet8x4", variables, inputs, 100), expected,
                             rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  with pytest.raises(checkpoint.CheckpointError, match="of model 'resnet8x4'.*'resnet32x4'"):
    checkpoint.load_model_variables(out, expected_shapes, model_name="resnet32x4")
  # Importing again into the same directory is refused: an import never overwrites.
  again = run_python(["-m", "experiments.import_teacher", "--model=resnet8x4",
                      "--pth=downloads/ckpt.pth", "--num_classes=100", "--out=teachers/r8x4"],
                     cwd=str(tmp_path), check=False)
  assert again.returncode == 2 and again.stderr.startswith("Error: --out=")
