"""Feature methods (fitnet, at, sp, rkd, pkt): their loss is the documented combination of
CE, KD and the feature term; relational terms see the global batch (simulated pmap equals one
device); taps and shapes are checked before training, naming what exists."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import quickstart
from kdjax import losses, methods
from kdjax.methods import Batch
from kdjax.models.output import Output
from kdjax.train import ConfigError
from kdjax.train.preflight import check_method_fits_models
from methods_helpers import PMAP_AXIS, build, np_cross_entropy, simulated_pmap_ops

FEATURE_METHODS = ["fitnet", "at", "sp", "rkd", "pkt"]
OPS = methods.single_device_ops()


def feature_batch(seed, b=8, masked=None, garbage=False):
  """Logits [b, 5]; taps 'stage1..3' maps [b, 4, 4, C] (student C=3, teacher C=6) and
  'embedding' [b, 7] / [b, 9]."""
  rng = np.random.default_rng(seed)

  def output(channels, width):
    features = {f"stage{i}": rng.normal(size=(b, 4, 4, channels)).astype(np.float32)
                for i in (1, 2, 3)}
    features["embedding"] = rng.normal(size=(b, width)).astype(np.float32)
    return rng.normal(size=(b, 5)).astype(np.float32) * 2, features

  (s_logits, s_features), (t_logits, t_features) = output(3, 7), output(6, 9)
  labels = rng.integers(0, 5, size=b).astype(np.int32)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  if garbage and masked is not None:
    for tree in (s_features, t_features):
      for value in tree.values():
        value[~where] = np.nan
    s_logits[~where], labels[~where] = np.nan, -100
  as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return Batch(student=Output(jnp.asarray(s_logits), as_jnp(s_features)),
               teacher=Output(jnp.asarray(t_logits), as_jnp(t_features)),
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.zeros((), jnp.int32))


def expected_term(name, method, params, batch):
  s, t = batch.student.features, batch.teacher.features
  if name == "fitnet":
    connector = params["connector0"]
    connected = s["embedding"] @ connector["kernel"] + connector["bias"]
    return jnp.mean(losses.fitnet(connected, t["embedding"]))
  if name == "at":
    return sum(jnp.mean(losses.attention_transfer(s[k], t[k])) for k in ("stage1", "stage2",
                                                                           "stage3"))
  if name == "rkd":
    return (25 * losses.rkd_distance(s["embedding"], t["embedding"])
            + 50 * losses.rkd_angle(s["embedding"], t["embedding"]))
  loss = {"sp": losses.similarity_preserving, "pkt": losses.pkt}[name]
  return loss(s["embedding"], t["embedding"])


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_loss_is_ce_plus_weighted_term_plus_optional_kd(name):
  batch = feature_batch(0)
  method = build(name, ce_weight=0.7, kd_weight=0.3, temperature=2.0)
  params, state = method.init(jax.random.PRNGKey(0), batch)
  loss, metrics, _ = method.loss(params, state, batch, OPS)
  term = expected_term(name, method, params, batch)
  kd = jnp.mean(losses.kd(batch.student.logits, batch.teacher.logits, temperature=2.0))
  ce = np_cross_entropy(batch.student.logits, batch.labels)
  weight = method.config.feature_weight
  np.testing.assert_allclose(metrics[name], term, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * ce + weight * term + 0.3 * kd, rtol=1e-5)
  assert set(metrics) == {"loss", "ce", "kd", "accuracy", name}


def test_defaults_are_repdistillers():
  defaults = {name: methods.METHODS[name].default_config() for name in FEATURE_METHODS}
  assert {n: c.feature_weight for n, c in defaults.items()} == {
      "fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0, "pkt": 30000.0}
  assert all(c.ce_weight == 1.0 and c.kd_weight == 0.0 for c in defaults.values())
  assert (defaults["rkd"].distance_weight, defaults["rkd"].angle_weight) == (25.0, 50.0)
  assert defaults["at"].p == 2.0 and defaults["at"].student_tap == "stage1,stage2,stage3"


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_simulated_pmap_gives_the_single_device_loss_and_gradient(name):
  masked = np.zeros(16, bool)
  masked[[2, 7, 8, 13]] = True
  batch = feature_batch(1, b=16, masked=masked, garbage=True)
  method = build(name)
  params, state = method.init(jax.random.PRNGKey(0), batch)

  def loss_of(student_features, b, ops):
    student = Output(b.student.logits, student_features)
    return method.loss(params, state, Batch(student, b.teacher, b.labels, b.where, b.step),
                       ops)[0]

  whole, whole_grad = jax.jit(lambda f: jax.value_and_grad(loss_of)(f, batch, OPS))(
      batch.student.features)
  shard = lambda tree: jax.tree.map(lambda x: jnp.reshape(x, (4, 4) + x.shape[1:]), tree)

  def replica(student, teacher, labels, where):
    b = Batch(student, teacher, labels, where, batch.step)
    return jax.value_and_grad(loss_of)(student.features, b, simulated_pmap_ops())

  replica_loss, replica_grad = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      shard(batch.student), shard(batch.teacher), shard(batch.labels), shard(batch.where))
  np.testing.assert_allclose(jnp.mean(replica_loss), whole, rtol=1e-5)
  # The step pmeans gradients: each replica's gradient / R is the whole batch's for its rows.
  for key, value in whole_grad.items():
    np.testing.assert_allclose(jnp.reshape(replica_grad[key], value.shape) / 4, value,
                               rtol=1e-4, atol=1e-7, err_msg=key)
    assert np.all(np.isfinite(value)) and np.all(np.asarray(value)[masked] == 0)


def test_unknown_tap_lists_the_taps_that_exist():
  batch = feature_batch(2)
  with pytest.raises(ValueError, match=r"config.sp.student_tap='stage9': the student model has "
                                       r"no such tap; its taps: embedding, stage1, stage2, "
                                       r"stage3"):
    build("sp", student_tap="stage9", teacher_tap="stage3").init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match=r"must name the same number"):
    build("at", student_tap="stage1,stage2", teacher_tap="stage2")


def _config(method, student, teacher, dataset="cifar100", num_classes=100, **fields):
  config = quickstart.get_config()
  config.dataset, config.num_classes, config.method = dataset, num_classes, method
  config.student.model, config.teacher.model = student, teacher
  config[method].update(fields)
  return config


PAIRS = [("resnet8x4", "resnet32x4"), ("resnet20", "resnet56"), ("resnet8", "resnet110")]


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_every_cifar_pair_traces_with_the_default_taps(name):
  """jax.eval_shape, no compilation: taps exist and shapes fit for each teacher/student."""
  for student, teacher in PAIRS:
    check_method_fits_models(_config(name, student, teacher))


def test_mismatched_maps_name_both_shapes_and_the_fix():
  with pytest.raises(ConfigError, match=r"config.fitnet.student_tap='stage1' has shape "
                                        r"\(2, 32, 32, 64\) and config.fitnet.teacher_tap="
                                        r"'stage2' has shape \(2, 16, 16, 128\): "
                                        r"config.fitnet.connector='linear' maps channels \(the "
                                        r"last axis\) only; connector='conv_reg' bridges"):
    check_method_fits_models(_config("fitnet", "resnet8x4", "resnet32x4", student_tap="stage1",
                                     teacher_tap="stage2"))
  with pytest.raises(ConfigError, match=r"config.at.student_tap='stage1': the student model has "
                                        r"no such tap; its taps: embedding, hidden1, hidden2"):
    check_method_fits_models(_config("at", "mlp", "cnn1d", dataset="mnist1d", num_classes=10))


def test_rkd_with_a_zero_weight_is_the_other_term_alone():
  batch = feature_batch(3)
  s, t = batch.student.features["embedding"], batch.teacher.features["embedding"]
  for fields, expected in (({"angle_weight": 0.0}, 25 * losses.rkd_distance(s, t)),
                           ({"distance_weight": 0.0}, 50 * losses.rkd_angle(s, t))):
    method = build("rkd", **fields)
    _, metrics, _ = method.loss({}, {}, batch, OPS)
    np.testing.assert_allclose(metrics["rkd"], expected, rtol=1e-6)


@pytest.mark.parametrize("student_size, teacher_size", [(8, 16), (16, 8), (10, 8), (8, 8)])
def test_conv_reg_connector_maps_sizes_as_repdistiller_and_trains_its_batch_norm(
    student_size, teacher_size):
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(4, student_size, student_size, 3)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(4, teacher_size, teacher_size, 5)), jnp.float32)
  batch = Batch(Output(jnp.asarray(rng.normal(size=(4, 7)), jnp.float32), {"stage2": student}),
                Output(jnp.asarray(rng.normal(size=(4, 7)), jnp.float32), {"stage2": teacher}),
                jnp.asarray([0, 1, 2, 3]), jnp.ones(4, bool), jnp.int32(0))
  method = build("fitnet", connector="conv_reg", student_tap="stage2", teacher_tap="stage2")
  params, state = method.init(jax.random.PRNGKey(0), batch)
  loss, metrics, new_state = method.loss(params, state, batch, OPS)
  from kdjax.methods.feature import ConvRegressor
  connected, updates = ConvRegressor(5, (teacher_size, teacher_size)).apply(
      {"params": params["connector0"], "batch_stats": state["batch_stats"]["connector0"]},
      student, train=True, mutable=["batch_stats"])
  assert connected.shape == teacher.shape
  expected = np.mean((np.asarray(connected, np.float64) - np.asarray(teacher)) ** 2)
  np.testing.assert_allclose(metrics["fitnet"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["ce"] + 100.0 * expected, rtol=1e-5)
  assert float(jnp.min(connected)) >= 0.0  # BatchNorm then ReLU, as ConvReg.
  jax.tree.map(np.testing.assert_allclose, new_state["batch_stats"]["connector0"],
               updates["batch_stats"])


def test_at_pools_the_larger_map_to_the_smaller_as_repdistiller():
  rng = np.random.default_rng(1)
  small = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
  large = jnp.asarray(rng.normal(size=(3, 8, 8, 6)), jnp.float32)
  batch = Batch(Output(jnp.zeros((3, 5)), {"stage1": large}),
                Output(jnp.zeros((3, 5)), {"stage1": small}),
                jnp.asarray([0, 1, 2]), jnp.ones(3, bool), jnp.int32(0))
  method = build("at", student_tap="stage1", teacher_tap="stage1")
  _, metrics, _ = method.loss({}, {}, batch, OPS)
  pooled = np.asarray(large).reshape(3, 4, 2, 4, 2, 6).mean(axis=(2, 4))  # 2x2 average pooling
  np.testing.assert_allclose(
      metrics["at"], np.mean(losses.attention_transfer(jnp.asarray(pooled), small)), rtol=1e-5)
