"""VGG, MobileNetV2/V1 and ShuffleNetV1/V2: parameter counts, taps, BN_BEFORE_RELU, torch import.

The fast tests use `jax.eval_shape` only. The slow tests import torch and compare with the
PyTorch definitions in `torch_mobile.py` (RepDistiller / mdistiller names and architecture):
parameter counts, and eval-mode logits and every tap after converting a random `state_dict`
(random BatchNorm statistics) with `kdjax.models.torch_import.convert_state_dict`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import mobilenet, shufflenet, torch_import, vgg

# PyTorch `sum(p.numel() for p in model.parameters())` of the anchors' own definitions
# (RepDistiller models/vgg.py vgg8_bn / vgg13_bn, models/mobilenetv2.py mobile_half,
# models/ShuffleNetv1.py ShuffleV1, models/ShuffleNetv2.py ShuffleV2 with num_classes=100;
# mdistiller models/imagenet/mobilenetv1.py MobileNetV1, 1000 classes), measured by running
# those files with torch 2.13; the CRD paper's table lists 3.96M, 9.46M, 0.81M, 0.95M, 1.36M.
PARAMETER_COUNTS = {
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "mobilenetv1": 4_231_976,
}
NAMES = sorted(PARAMETER_COUNTS)

# Documented tap shapes (batch 2), as in each module's docstring.
TAP_SHAPES = {
    "vgg8": {"stem": (32, 32, 64), "stage1": (16, 16, 128), "stage2": (8, 8, 256),
             "stage3": (4, 4, 512), "stage4": (4, 4, 512), "embedding": (512,)},
    "mobilenetv2": {"stem": (16, 16, 16), "stage1": (16, 16, 12), "stage2": (8, 8, 16),
                    "stage3": (4, 4, 48), "stage4": (2, 2, 160), "embedding": (1280,)},
    "shufflenetv1": {"stem": (32, 32, 24), "stage1": (16, 16, 240), "stage2": (8, 8, 480),
                     "stage3": (4, 4, 960), "embedding": (960,)},
    "shufflenetv2": {"stem": (32, 32, 24), "stage1": (16, 16, 116), "stage2": (8, 8, 232),
                     "stage3": (4, 4, 464), "embedding": (1024,)},
    "mobilenetv1": {"stem": (112, 112, 32), "stage1": (56, 56, 128), "stage2": (28, 28, 256),
                    "stage3": (14, 14, 512), "stage4": (7, 7, 1024), "embedding": (1024,)},
}
TAP_SHAPES["vgg13"] = TAP_SHAPES["vgg8"]

BN_BEFORE_RELU = {**vgg.BN_BEFORE_RELU, **mobilenet.BN_BEFORE_RELU,
                  **shufflenet.BN_BEFORE_RELU}


def _num_classes(name):
  return 1000 if name == "mobilenetv1" else 100


def _size(name):
  return 224 if models.registry.model_input_kind(name) == "image224" else 32


@functools.lru_cache(maxsize=None)
def _abstract(name):
  """(variables, Output) shapes of `name` for a batch of 2, without computing anything."""
  module = models.get_model(name, num_classes=_num_classes(name))
  inputs = jax.ShapeDtypeStruct((2, _size(name), _size(name), 3), jnp.float32)

  def run(x):
    variables = models.init_variables(module, jax.random.key(0), x)
    return variables, models.apply_fn(module)(variables, x, train=False)[0]
  return jax.eval_shape(run, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_pytorch_definitions(name):
  variables, _ = _abstract(name)
  assert models.count_params(variables["params"]) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_taps_have_the_documented_shapes(name):
  _, output = _abstract(name)
  assert output.logits.shape == (2, _num_classes(name))
  assert output.logits.dtype == jnp.float32
  shapes = {k: v.shape[1:] for k, v in output.features.items()}
  expected = dict(TAP_SHAPES[name])
  # Every model with stage taps has a pre-ReLU twin of each, of the same shape.
  expected.update({f"{k}_preact": v for k, v in TAP_SHAPES[name].items()
                   if k.startswith("stage")})
  assert shapes == expected
  assert all(v.shape[0] == 2 for v in output.features.values())


# One model per block type (the other models share their BatchNorm / conv constructors).
@pytest.mark.parametrize("name", ["vgg8", "mobilenetv1", "shufflenetv1"])
def test_training_mode_updates_exactly_the_batch_stats(name):
  variables, _ = _abstract(name)
  module = models.get_model(name, num_classes=_num_classes(name), batch_norm_axis_name="batch")
  inputs = jax.ShapeDtypeStruct((2, _size(name), _size(name), 3), jnp.float32)
  # The axis name is bound only in training, so vmap over a device-like axis.
  apply = jax.vmap(lambda v, x: models.apply_fn(module)(v, x, train=True),
                   in_axes=(None, 0), axis_name="batch")
  inputs = jax.ShapeDtypeStruct((1, *inputs.shape), inputs.dtype)
  output, new_state = jax.eval_shape(apply, variables, inputs)
  assert set(new_state) == {"batch_stats"}
  assert (jax.tree_util.tree_structure(new_state["batch_stats"])
          == jax.tree_util.tree_structure(variables["batch_stats"]))
  assert output.logits.shape == (1, 2, _num_classes(name))


def test_input_kinds_and_batch_norm_flags():
  assert {n: models.registry.model_input_kind(n) for n in NAMES} == {
      "vgg8": "image32", "vgg13": "image32", "mobilenetv2": "image32",
      "shufflenetv1": "image32", "shufflenetv2": "image32", "mobilenetv1": "image224"}
  assert set(NAMES) <= models.USES_BATCH_NORM


@pytest.mark.parametrize("name", sorted(BN_BEFORE_RELU))
def test_bn_before_relu_names_batch_norms_of_the_tap_width(name):
  variables, output = _abstract(name)
  table = BN_BEFORE_RELU[name]
  assert sorted(table) == sorted(k for k in output.features if k.endswith("_preact"))
  for tap, path in table.items():
    params, stats = variables["params"], variables["batch_stats"]
    for part in path.split("/"):
      params, stats = params[part], stats[part]
    channels = output.features[tap].shape[-1]
    assert {k: v.shape for k, v in params.items()} == {"scale": (channels,),
                                                       "bias": (channels,)}, (tap, path)
    assert {k: v.shape for k, v in stats.items()} == {"mean": (channels,),
                                                      "var": (channels,)}, (tap, path)


def test_bn_before_relu_tables_are_the_last_batch_norms_of_the_anchors_stages():
  # RepDistiller vgg `block{k}[-1]`, mobilenetv2 `blocks[1, 2, 4, 6][-1].conv[-1]`,
  # mdistiller mobilenetv1 `model[3, 5, 11, 13][-2]`; the ShuffleNets raise NotImplementedError.
  assert BN_BEFORE_RELU["vgg13"]["stage2_preact"] == "block2_bn1"
  assert BN_BEFORE_RELU["vgg8"]["stage4_preact"] == "block4_bn0"
  assert BN_BEFORE_RELU["mobilenetv2"] == {
      "stage1_preact": "group1_block1/project_bn", "stage2_preact": "group2_block2/project_bn",
      "stage3_preact": "group4_block2/project_bn", "stage4_preact": "group6_block0/project_bn"}
  assert BN_BEFORE_RELU["mobilenetv1"]["stage3_preact"] == "block11/pointwise_bn"
  assert "shufflenetv1" not in BN_BEFORE_RELU and "shufflenetv2" not in BN_BEFORE_RELU


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_gives_the_pytorch_channel_order(groups):
  # PyTorch: x.view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W), in numpy.
  nchw = np.arange(2 * 12 * 2 * 3, dtype=np.float32).reshape(2, 12, 2, 3)
  expected = nchw.reshape(2, groups, 12 // groups, 2, 3).transpose(0, 2, 1, 3, 4)
  expected = expected.reshape(2, 12, 2, 3).transpose(0, 2, 3, 1)
  got = shufflenet.channel_shuffle(jnp.asarray(nchw.transpose(0, 2, 3, 1)), groups)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Hand-checked: 6 channels, 2 groups -> 0, 3, 1, 4, 2, 5.
  np.testing.assert_array_equal(
      np.asarray(shufflenet.channel_shuffle(jnp.arange(6.0)[None], 2))[0], [0, 3, 1, 4, 2, 5])


def test_channel_shuffle_rejects_indivisible_channels():
  with pytest.raises(ValueError, match=r"channel_shuffle: 7 channels do not split into 2"):
    shufflenet.channel_shuffle(jnp.zeros((1, 7)), 2)


def test_models_reject_non_image_inputs():
  module = models.get_model("mobilenetv2", num_classes=10)
  with pytest.raises(ValueError, match=r"MobileNetV2: inputs must be NHWC images \[B, H, W, 3\], "
                                       r"got shape \(2, 3, 32, 32\)"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((2, 3, 32, 32))))


def test_every_model_has_a_torch_importer():
  assert set(NAMES) <= set(torch_import.importable_models())


# ---------------------------------------------------------------------------------- slow
def _torch_model(name, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_mobile  # pylint: disable=g-import-not-at-top
  constructor, _ = torch_mobile.TORCH_MODELS[name]
  torch.manual_seed(seed)
  model = constructor(_num_classes(name)).eval()
  torch_mobile.randomize_batch_norm(model, torch.Generator().manual_seed(seed + 1))
  return model


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_torch(name):
  model = _torch_model(name)
  variables, _ = _abstract(name)
  assert models.count_params(variables["params"]) == sum(p.numel() for p in model.parameters())
  assert PARAMETER_COUNTS[name] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converted_state_dict_gives_torch_logits_and_taps(name):
  import torch  # pylint: disable=g-import-not-at-top
  model = _torch_model(name)
  size = _size(name)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = torch_import.convert_state_dict(name, state_dict, num_classes=_num_classes(name),
                                              input_shape=(size, size, 3))
  images = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    logits, taps = model(torch.from_numpy(images))
  module = models.get_model(name, num_classes=_num_classes(name))
  output, _ = models.apply_fn(module)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)),
                                      train=False)
  expected = logits.numpy()
  np.testing.assert_allclose(np.asarray(output.logits), expected,
                             atol=1e-5 * np.abs(expected).max(), rtol=0)
  assert sorted(taps) == sorted(output.features)
  for tap, value in taps.items():
    value = value.numpy()
    if value.ndim == 4:
      value = value.transpose(0, 2, 3, 1)  # NCHW -> NHWC: same channel order, shuffles included
    np.testing.assert_allclose(np.asarray(output.features[tap]), value,
                               atol=1e-5 * np.abs(value).max(), rtol=0, err_msg=tap)
