"""Mixed precision (`config.dtype`, `config.teacher.dtype`) and the BN-folded teacher
(`config.teacher.fold_batch_norm`): kdjax/models/precision.py, kdjax/train/teachers.py."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import run_python
from kdjax import methods, models
from kdjax.models import fold, precision, registry
from kdjax.models.output import Output
from kdjax.train import state as state_lib, step as step_lib
from kdjax.teachers import live as teachers_lib
from kdjax.train.validate import ConfigError, validate_config
from configs import common, quickstart

# 8x8 images: resnet8 (BatchNorm, convs, a dense head) at a fraction of CIFAR's cost.
INPUTS = np.asarray(jax.random.normal(jax.random.key(0), (8, 8, 8, 3)), np.float32)
LABELS = np.arange(8) % 10
TINY = "tiny_batch_norm_net_test"  # Registered while the tests run (a user's model).


def _perturbed(variables, seed):
  """Variables with non-trivial BatchNorm statistics (|noise| keeps variances positive)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.2 * np.abs(rng.normal(size=x.shape)).astype(x.dtype),
                      variables)


def _he_init(shapes, seed):
  """Host-side variables for `shapes` (no compiled init): He-normal kernels, unit BatchNorm."""
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


def _relative_error(got, want):
  return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() /
               np.abs(np.asarray(want, np.float64)).max())


class TinyBatchNormNet(nn.Module):
  """A user-style linen model (layers with flax's default dtype=None) with BatchNorm."""

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        nn.Conv(4, (3, 3))(inputs)))
    embedding = jnp.mean(x, axis=(1, 2))
    return Output(nn.Dense(10)(embedding), {"embedding": embedding})


@pytest.fixture(scope="module")
def tiny():
  """(float32 apply, bfloat16 apply, float32 variables) of TinyBatchNormNet."""
  module = TinyBatchNormNet()
  variables = _he_init(jax.eval_shape(lambda x: module.init(jax.random.key(1), x), INPUTS), 1)
  apply = models.apply_fn(module)
  registry.register(TINY, lambda num_classes: TinyBatchNormNet(), input_kind="image32")
  yield apply, precision.mixed_precision(apply, "bfloat16"), variables
  registry.unregister(TINY)


@pytest.fixture(scope="module")
def resnet8():
  """(float32 ModelFns, bfloat16 ModelFns, float32 variables) of resnet8."""
  f32 = registry.get_model_fns("resnet8", num_classes=10)
  bf16 = precision.model_fns("resnet8", num_classes=10, dtype="bfloat16")
  return f32, bf16, _he_init(jax.eval_shape(f32.init, jax.random.key(1), INPUTS), 1)


def test_float32_policy_is_the_identity(tiny):
  apply, _, _ = tiny
  assert precision.mixed_precision(apply, "float32") is apply
  assert precision.mixed_precision(apply, jnp.float32) is apply
  # The config path (`config.dtype='float32'`) builds the model exactly as before.
  want = registry.get_model_fns("cnn1d", num_classes=10)
  same = precision.model_fns("cnn1d", num_classes=10, dtype="float32")
  signal = INPUTS.reshape(8, -1)[:, :40]
  variables = _he_init(jax.eval_shape(want.init, jax.random.key(0), signal), 0)

  def outputs_and_grads(fns):
    def loss(params):
      output, _ = fns.apply({"params": params}, signal, train=True, rng=None)
      return jnp.sum(output.logits ** 2), output
    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  for a, b in zip(jax.tree.leaves(outputs_and_grads(same)),
                  jax.tree.leaves(outputs_and_grads(want))):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_computes_in_bfloat16_and_returns_float32(resnet8):
  f32, bf16, variables = resnet8
  jaxpr = jax.make_jaxpr(lambda v: bf16.apply(v, INPUTS, train=True, rng=None))(variables)
  # Every convolution (also inside nested sub-jaxprs) produces bfloat16.
  conv_lines = [line for line in str(jaxpr).splitlines() if "conv_general_dilated[" in line]
  assert conv_lines and all(":bf16[" in line.split("=")[0] for line in conv_lines), conv_lines[:2]

  want, want_state = jax.jit(lambda v: f32.apply(v, INPUTS, train=True, rng=None))(variables)
  got, got_state = jax.jit(lambda v: bf16.apply(v, INPUTS, train=True, rng=None))(variables)
  assert got.logits.dtype == jnp.float32
  assert {v.dtype for v in got.features.values()} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(got_state)} == {jnp.dtype(jnp.float32)}
  # bfloat16 keeps 8 significant bits (2**-8 = 0.4%); a few layers compound it.
  assert 0 < _relative_error(got.logits, want.logits) < 5e-2
  assert _relative_error(got.features["embedding"], want.features["embedding"]) < 5e-2
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    assert _relative_error(a, b) < 2e-2


def test_integer_inputs_keys_and_integer_state_are_untouched():
  seen = {}

  def apply(variables, inputs, *, train, rng=None):
    seen.update(inputs=inputs.dtype, kernel=variables["params"]["w"].dtype,
                count=variables["state"]["count"].dtype, rng=rng.dtype)
    logits = jnp.take(variables["params"]["w"], inputs, axis=0)
    return Output(logits, {"hidden": logits}), {"state": {"count": variables["state"]["count"]
                                                          + 1}}

  wrapped = precision.mixed_precision(apply, jnp.bfloat16)
  variables = {"params": {"w": jnp.ones((5, 3))}, "state": {"count": jnp.zeros((), jnp.int32)}}
  key = jax.random.key(0)
  output, state = wrapped(variables, jnp.array([[1, 2]], jnp.int32), train=True, rng=key)
  assert seen == dict(inputs=jnp.int32, kernel=jnp.bfloat16, count=jnp.int32, rng=key.dtype)
  assert output.logits.dtype == jnp.float32 and output.features["hidden"].dtype == jnp.float32
  assert state["state"]["count"].dtype == jnp.int32 and int(state["state"]["count"]) == 1


def test_bfloat16_train_step_keeps_float32_parameters_and_statistics(tiny):
  f32_apply, bf16_apply, variables = tiny
  teacher_variables = _perturbed(variables, 6)
  method_class = methods.get_method_class("kd")
  method = method_class(method_class.default_config())
  optimizer = optax.sgd(0.1, momentum=0.9)
  train_state = state_lib.create(student_variables=variables, method_params={},
                                 method_state={}, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  batch = {"inputs": INPUTS, "labels": LABELS}
  ops = methods.single_device_ops()
  steps = {}
  for name, student_apply in (("float32", f32_apply), ("bfloat16", bf16_apply)):
    pure = step_lib.make_train_step(student_apply=student_apply, teacher_apply=f32_apply,
                                    method=method, optimizer=optimizer)
    steps[name] = jax.jit(lambda s, t, b, pure=pure: pure(s, t, b, ops))(
        train_state, teacher_variables, batch)
  (want, want_metrics), (got, got_metrics) = steps["float32"], steps["bfloat16"]
  assert {x.dtype for x in jax.tree.leaves((got.params, got.opt_state, got.model_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  # The parameters moved, along the float32 step's direction.
  got_update = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(got.params), jax.tree.leaves(train_state.params))])
  want_update = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(want.params), jax.tree.leaves(train_state.params))])
  cosine = got_update @ want_update / np.linalg.norm(got_update) / np.linalg.norm(want_update)
  assert np.linalg.norm(got_update) > 0 and cosine > 0.99, cosine
  # A user model's layers (dtype None) compute in bfloat16 from the cast inputs: close, not equal.
  assert 0 < abs(float(got_metrics["loss"]) - float(want_metrics["loss"])) < 2e-2 * abs(
      float(want_metrics["loss"]))
  for a, b in zip(jax.tree.leaves(got.model_state), jax.tree.leaves(want.model_state)):
    assert _relative_error(a, b) < 2e-2


def _config(**teacher_fields):
  config = quickstart.get_config()
  config.teacher.update(teacher_fields)
  return config


def test_folded_teacher_through_the_config_equals_the_teacher(tiny):
  apply_f32, _, variables = tiny
  variables = _perturbed(variables, 3)
  want, _ = jax.jit(lambda v: apply_f32(v, INPUTS, train=False))(variables)
  apply, folded = teachers_lib.frozen_teacher(
      TINY, apply_f32, variables, config=_config(fold_batch_norm=True),
      sample_inputs=INPUTS[:2], model_kwargs={})
  assert "batch_stats" not in folded
  got, state = jax.jit(lambda v: apply(v, INPUTS, train=False, rng=None))(folded)
  assert state == {}
  scale = np.abs(want.logits).max()
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_array_equal(got.logits.argmax(-1), want.logits.argmax(-1))

  apply, stored = teachers_lib.frozen_teacher(
      TINY, apply_f32, variables, config=_config(fold_batch_norm=True, dtype="bfloat16"),
      sample_inputs=INPUTS[:2], model_kwargs={})
  assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
  got, _ = jax.jit(lambda v: apply(v, INPUTS, train=False, rng=None))(stored)
  assert got.logits.dtype == jnp.float32 and 0 < _relative_error(got.logits, want.logits) < 5e-2


def test_defaults_leave_the_teacher_as_loaded(tiny):
  apply_f32, _, variables = tiny
  apply, same = teachers_lib.frozen_teacher(TINY, apply_f32, variables,
                                            config=common.base_config(), sample_inputs=INPUTS,
                                            model_kwargs={})
  assert apply is apply_f32 and same is variables


def test_folding_a_model_without_batch_norm_is_a_one_line_error():
  variables = {"params": {"conv1": {"kernel": np.zeros((5, 1, 25), np.float32)}}}
  with pytest.raises(ValueError, match="no BatchNorm statistics") as error:
    fold.fold_model("cnn1d", variables, np.zeros((2, 40), np.float32), num_classes=10)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float16", r"config\.dtype='float16' is not valid.*valid values: bfloat16, float32"),
    ("teacher.dtype", "bf16",
     r"config\.teacher\.dtype='bf16' is not valid.*valid values: bfloat16, float32"),
    ("teacher.fold_batch_norm", "yes",
     r"config\.teacher\.fold_batch_norm must be true or false, got 'yes'"),
    ("teacher.fold_batch_norm", True,
     r"config\.teacher\.fold_batch_norm=True needs teachers with BatchNorm, but "
     r"config\.teacher\.model='cnn1d' has none"),
])
def test_bad_fields_are_one_line_config_errors(field, value, message):
  config = quickstart.get_config()
  validate_config(config, num_devices=1)  # The recipe itself is valid.
  parent, _, name = field.rpartition(".")
  block = config[parent] if parent else config
  if isinstance(value, str) and isinstance(block[name], bool):  # E.g. from a JSON config.
    config[parent] = ml_collections.ConfigDict({**block.to_dict(), name: value})
  else:
    block[name] = value
  with pytest.raises(ConfigError, match=message) as error:
    validate_config(config, num_devices=1)
  assert "\n" not in str(error.value)


def _accuracy(workdir, run):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["runs"][run]["eval_accuracy"]


@pytest.mark.slow  # Three short quickstart runs (~3 min here).
def test_bfloat16_student_and_teacher_train_like_float32(tmp_path, data_dir):
  common_args = ["-m", "experiments.main", "--config=configs/quickstart.py",
                 f"--config.data_dir={data_dir}", "--config.num_steps=500",
                 "--config.eval_every_steps=500", "--config.checkpoint_every_steps=500",
                 "--config.progress=false"]
  reference = str(tmp_path / "float32")
  run_python(common_args + [f"--workdir={reference}", "--config.suite=teacher,kd"])
  teacher = os.path.join(reference, "teacher", "checkpoints")
  accuracies = {"float32": _accuracy(reference, "kd")}
  for name, flag in (("student_bf16", "--config.dtype=bfloat16"),
                     ("teacher_bf16", "--config.teacher.dtype=bfloat16")):
    workdir = str(tmp_path / name)
    run_python(common_args + [f"--workdir={workdir}", "--config.suite=kd",
                              f"--config.teacher.checkpoint={teacher}", flag])
    accuracies[name] = _accuracy(workdir, "kd")
    with open(os.path.join(workdir, "kd", "config.json")) as f:
      run_config = json.load(f)
    assert "bfloat16" in (run_config["dtype"], run_config["teacher"]["dtype"])
  print("kd eval accuracy after 500 steps:", accuracies)
  assert accuracies["float32"] > 0.6
  # The runs differ like two seeds do (a bf16 rounding changes the trajectory): +-4 points.
  for name in ("student_bf16", "teacher_bf16"):
    assert abs(accuracies[name] - accuracies["float32"]) < 0.04, accuracies
