"""CIFAR ResNets, WRNs and ImageNet ResNets: parameter counts, taps, OFD's BN-before-ReLU table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import cifar_resnet, imagenet_resnet, wrn

_FAMILIES = (cifar_resnet, wrn, imagenet_resnet)
_NAMES = sorted(name for family in _FAMILIES for name in family.MODELS)
_BN_BEFORE_RELU = {name: table for family in _FAMILIES
                   for name, table in family.BN_BEFORE_RELU.items()}

# PyTorch `sum(p.numel() for p in model.parameters())`, for the number of classes given.
# torchvision's documented counts (1000 classes): resnet18 11,689,512, resnet34 21,797,672,
# resnet50 25,557,032. RepDistiller (100 classes): resnet8x4 1,233,540 and resnet32x4 7,433,860
# (its README / CRD paper tables), the others as counted from its models/*.py definitions by
# tests/models/torch_resnets.py (test_resnets_import.py re-counts them all with torch).
EXPECTED_PARAMETERS = {
    "resnet8": (100, 83_892), "resnet14": (100, 181_108), "resnet20": (100, 278_324),
    "resnet32": (100, 472_756), "resnet44": (100, 667_188), "resnet56": (100, 861_620),
    "resnet110": (100, 1_736_564), "resnet8x4": (100, 1_233_540),
    "resnet32x4": (100, 7_433_860),
    "wrn_16_1": (100, 180_916), "wrn_16_2": (100, 703_284), "wrn_40_1": (100, 569_780),
    "wrn_40_2": (100, 2_255_156),
    "resnet18": (1000, 11_689_512), "resnet34": (1000, 21_797_672),
    "resnet50": (1000, 25_557_032), "resnet50_cifar": (100, 23_705_252),
}


# name -> (input side, stem tap side, stem width, stage widths); stages halve from the stem.
_TAPS = {
    **{name: (32, 32, 16, (16, 32, 64)) for name in (
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "resnet8x4": (32, 32, 32, (64, 128, 256)), "resnet32x4": (32, 32, 32, (64, 128, 256)),
    "wrn_16_1": (32, 32, 16, (16, 32, 64)), "wrn_40_1": (32, 32, 16, (16, 32, 64)),
    "wrn_16_2": (32, 32, 16, (32, 64, 128)), "wrn_40_2": (32, 32, 16, (32, 64, 128)),
    "resnet18": (224, 56, 64, (64, 128, 256, 512)), "resnet34": (224, 56, 64, (64, 128, 256, 512)),
    "resnet50": (224, 56, 64, (256, 512, 1024, 2048)),
    "resnet50_cifar": (32, 32, 64, (256, 512, 1024, 2048)),
}


def _abstract(name, num_classes, shape):
  """Variables and Output as shapes only: one trace, nothing computed."""
  module = models.get_model(name, num_classes=num_classes)
  output, variables = jax.eval_shape(lambda: module.init_with_output(
      jax.random.key(0), jnp.zeros(shape), train=False))
  return variables, output


def test_every_family_model_has_expected_numbers():
  assert sorted(EXPECTED_PARAMETERS) == sorted(_TAPS) == _NAMES
  assert sorted(_BN_BEFORE_RELU) == _NAMES


@pytest.mark.parametrize("name", _NAMES)
def test_parameter_count_taps_and_bn_before_relu(name):
  num_classes, expected_count = EXPECTED_PARAMETERS[name]
  side, stem, stem_width, widths = _TAPS[name]
  variables, output = _abstract(name, num_classes, (2, side, side, 3))
  assert models.count_params(variables["params"]) == expected_count

  expected = {"stem": (2, stem, stem, stem_width), "embedding": (2, widths[-1])}
  for stage, width in enumerate(widths, start=1):
    size = stem // 2 ** (stage - 1)
    expected[f"stage{stage}"] = expected[f"stage{stage}_preact"] = (2, size, size, width)
  assert {k: v.shape for k, v in output.features.items()} == expected
  assert output.logits.shape == (2, num_classes)

  # The BN OFD reads for each pre-ReLU tap: a BatchNorm (scale, bias, mean, var) of the tap's
  # width, in the stage's last block (ResNets) or the next stage's first block / final BN (WRN).
  table = _BN_BEFORE_RELU[name]
  assert sorted(table) == [f"stage{k}_preact" for k in range(1, len(widths) + 1)]
  params, stats = variables["params"], variables["batch_stats"]
  for tap, path in table.items():
    node_params, node_stats = params, stats
    for part in path.split("/"):
      assert part in node_params, f"{name}: {path} is not in the params tree"
      node_params, node_stats = node_params[part], node_stats[part]
    assert set(node_params) == {"scale", "bias"} and set(node_stats) == {"mean", "var"}
    assert node_params["scale"].shape == (output.features[tap].shape[-1],)
    stage = int(tap[len("stage")])
    if name in wrn.MODELS:
      assert path == (f"stage{stage + 1}_block0/bn1" if stage < 3 else "final_bn")
    else:
      last_block = max(int(k.split("_block")[1]) for k in params
                       if k.startswith(f"stage{stage}_block"))
      assert path.startswith(f"stage{stage}_block{last_block}/bn")


def test_imagenet_resnet_takes_other_sizes_divisible_by_32():
  _, output = _abstract("resnet18", 5, (1, 64, 64, 3))
  assert output.features["stage4"].shape == (1, 2, 2, 512)


def _random_variables(module, inputs, seed=0):
  """Random variables of the module's shapes, drawn with numpy: kernels scaled by their fan-in,
  random BatchNorm scale/bias/statistics (so that they matter). Flax's own init compiles for
  tens of seconds on a loaded CPU; its values are not what these tests are about."""
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    key = path[-1].key
    if key == "kernel":
      return rng.normal(0, np.prod(shape.shape[:-1]) ** -0.5, shape.shape)
    if key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape.shape)
    return rng.normal(0, 0.2, shape.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(
      lambda path, shape: jnp.asarray(draw(path, shape), jnp.float32), shapes)


def _with_biases(variables, paths, biases):
  """A copy of `variables` with the bias of the BatchNorm at each Flax path replaced."""
  params = dict(variables["params"])
  for path, bias in zip(paths, biases):
    *parents, leaf = path.split("/")
    node = params
    for part in parents:
      node[part] = dict(node[part])
      node = node[part]
    node[leaf] = dict(node[leaf], bias=bias)
  return dict(variables, params=params)


@pytest.mark.parametrize("name, table", [
    ("resnet8", cifar_resnet.BN_BEFORE_RELU["resnet8"]),
    ("wrn_16_1", wrn.BN_BEFORE_RELU["wrn_16_1"]),  # first group of equal widths: raw residual
    ("bottleneck", {f"stage{k}_preact": f"stage{k}_block{b}/bn3"
                    for k, b in ((1, 0), (2, 1), (3, 0), (4, 0))}),
])
def test_preact_taps_are_the_named_batch_norm_plus_a_residual(name, table):
  """Shifting the named BN's bias by d shifts its pre-ReLU tap by exactly d: the tap is that
  BN's output, or that plus a residual that does not depend on it. A BN further inside the
  block (behind a ReLU and a conv) would not. ResNet 'stage{k}' is relu('stage{k}_preact')."""
  if name == "bottleneck":  # The Bottleneck code path of resnet50, small enough to compile.
    module = imagenet_resnet.ResNet(blocks_per_stage=(1, 2, 1, 1), bottleneck=True,
                                    imagenet_stem=False, widths=(4, 8, 8, 8), num_classes=5)
  else:
    module = models.get_model(name, num_classes=5)
  inputs = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = _random_variables(module, inputs)
  taps, paths = list(table), list(table.values())
  biases = []
  for path in paths:
    node = variables["params"]
    for part in path.split("/"):
      node = node[part]
    biases.append(node["bias"])
  shifts = [jnp.linspace(-1.0, 1.0, b.shape[0]) for b in biases]

  features = jax.jit(lambda biases: module.apply(
      _with_biases(variables, paths, biases), inputs, train=False).features)
  before = features(biases)
  for k, (tap, path) in enumerate(zip(taps, paths)):
    after = features([b + shifts[k] if j == k else b for j, b in enumerate(biases)])
    np.testing.assert_allclose(after[tap] - before[tap],
                               np.broadcast_to(shifts[k], before[tap].shape), atol=2e-5,
                               err_msg=f"{name} {tap} {path}")
    stage = before[tap[:-len("_preact")]]
    if name.startswith("wrn"):  # Pre-activation: the stage output is the raw sum.
      assert not np.allclose(stage, before[tap])
    else:
      np.testing.assert_array_equal(stage, jax.nn.relu(before[tap]))
