"""MiniLM (method `minilm`): its loss is the documented combination of CE, KD and the v1 / v2
term on the configured layers; taps, layers and shapes are checked before training, naming
what exists; three train steps distil vit_small into vit_tiny."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from kdjax import losses, methods, models
from kdjax.losses.attention import minilm_v1, minilm_v2
from kdjax.methods import Batch
from kdjax.models.output import Output
from kdjax.train import ConfigError
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib
from kdjax.train.preflight import check_method_fits_models
from methods_helpers import build, np_cross_entropy

OPS = methods.single_device_ops()


def attention_batch(seed, b=6, student=(2, 5, 4), teacher=(2, 5, 6), depth=(2, 2),
                    masked=None):
  """Logits [b, 5]; taps query/key/value{i} [b, heads, T, head_dim] for i = 1..depth, with
  (heads, T, head_dim) = `student` / `teacher`; NaN features and logits in masked rows."""
  rng = np.random.default_rng(seed)

  def output(shape, layers):
    features = {f"{kind}{i}": rng.normal(size=(b,) + shape).astype(np.float32)
                for i in range(1, layers + 1) for kind in ("query", "key", "value")}
    features["embedding"] = rng.normal(size=(b, 7)).astype(np.float32)
    return rng.normal(size=(b, 5)).astype(np.float32) * 2, features

  (s_logits, s_features), (t_logits, t_features) = output(student, depth[0]), output(teacher,
                                                                                      depth[1])
  labels = rng.integers(0, 5, size=b).astype(np.int32)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  for features in (s_features, t_features):
    for value in features.values():
      value[~where] = np.nan
  s_logits[~where], labels[~where] = np.nan, -100
  as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return Batch(student=Output(jnp.asarray(s_logits), as_jnp(s_features)),
               teacher=Output(jnp.asarray(t_logits), as_jnp(t_features)),
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.zeros((), jnp.int32))


def test_loss_is_ce_plus_weighted_term_on_the_configured_layers_plus_kd():
  masked = np.array([False, True, False, False, True, False])
  batch = attention_batch(0, masked=masked)
  fields = dict(ce_weight=0.7, kd_weight=0.3, temperature=2.0, feature_weight=5.0,
                student_layer=1, teacher_layer=-1, num_relation_heads=4)
  versions = {v: build("minilm", version=v, **fields) for v in ("v1", "v2")}
  assert versions["v1"].init(jax.random.PRNGKey(0), batch) == ({}, {})
  keep = ~masked
  s = {k: np.asarray(v)[keep] for k, v in batch.student.features.items()}
  t = {k: np.asarray(v)[keep] for k, v in batch.teacher.features.items()}
  s_logits, t_logits = (np.asarray(o.logits)[keep] for o in (batch.student, batch.teacher))

  @jax.jit  # One compilation for the methods and the expected values (eager calls are slow).
  def run(student, teacher, labels, where, s, t, s_logits, t_logits):
    b = Batch(student, teacher, labels, where, batch.step)
    # The same on the selected rows alone, from student layer 1 and teacher layer 2 (the
    # last; every layer's taps differ, so other layers would give other values).
    args = (s["query1"], t["query2"], s["key1"], t["key2"], s["value1"], t["value2"])
    expected = {"v1": jnp.mean(minilm_v1(*args)),
                "v2": jnp.mean(minilm_v2(*args, num_relation_heads=4))}
    kd = jnp.mean(losses.kd(s_logits, t_logits, temperature=2.0))
    return {v: (method.loss({}, {}, b, OPS)[:2], expected[v], kd)
            for v, method in versions.items()}

  results = run(batch.student, batch.teacher, batch.labels, batch.where, s, t, s_logits,
                t_logits)
  ce = np_cross_entropy(s_logits, np.asarray(batch.labels)[keep])
  for version, ((loss, metrics), term, kd) in results.items():
    np.testing.assert_allclose(metrics["minilm"], term, rtol=1e-5, err_msg=version)
    np.testing.assert_allclose(loss, 0.7 * ce + 5.0 * term + 0.3 * kd, rtol=1e-5)
    assert set(metrics) == {"loss", "ce", "kd", "accuracy", "minilm"} and float(term) > 0.1


def test_shape_mismatches_name_both_shapes():
  batch = attention_batch(1, student=(2, 5, 4), teacher=(3, 5, 4))
  with pytest.raises(ValueError, match=r"config.minilm.student_layer=-1 \(tap 'query2'\) has "
                                       r"shape \(6, 2, 5, 4\) and config.minilm.teacher_layer=-1 "
                                       r"\(tap 'query2'\) has shape \(6, 3, 5, 4\): version 'v1' "
                                       r"compares attention head by head"):
    build("minilm", version="v1").init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match=r"has shape \(6, 3, 5, 4\): config.minilm."
                                       r"num_relation_heads=5 must divide both widths heads \* "
                                       r"head_dim \(8 and 12\)"):
    build("minilm", num_relation_heads=5).init(jax.random.PRNGKey(0), batch)
  build("minilm", num_relation_heads=4).init(jax.random.PRNGKey(0), batch)  # v2: it fits.
  tokens = attention_batch(1, student=(2, 5, 4), teacher=(2, 7, 4))
  with pytest.raises(ValueError, match=r"has shape \(6, 2, 5, 4\) and .* has shape "
                                       r"\(6, 2, 7, 4\): relations are T x T"):
    build("minilm", num_relation_heads=4).init(jax.random.PRNGKey(0), tokens)


def test_layers_taps_and_fields_are_checked():
  batch = attention_batch(2)
  with pytest.raises(ValueError, match=r"config.minilm.teacher_layer=3: the teacher model has 2 "
                                       r"layers \(taps query1..query2\); use 1..2, or -1..-2"):
    build("minilm", teacher_layer=3, num_relation_heads=4).init(jax.random.PRNGKey(0), batch)
  no_taps = Batch(student=Output(batch.student.logits, {"embedding": jnp.zeros((6, 7))}),
                  teacher=batch.teacher, labels=batch.labels, where=batch.where,
                  step=batch.step)
  with pytest.raises(ValueError, match=r"config.minilm.student_layer=-1: the student model has no "
                                       r"attention taps .*; its taps: embedding\."):
    build("minilm", num_relation_heads=4).init(jax.random.PRNGKey(0), no_taps)
  for field, value, message in (
      ("version", "v3", r"config.minilm.version must be one of v1, v2, got 'v3'"),
      ("student_layer", 0, r"config.minilm.student_layer must be a non-zero integer"),
      ("num_relation_heads", 0, r"config.minilm.num_relation_heads must be a positive "
                                r"integer, got 0"),
      ("feature_weight", -1.0, r"config.minilm.feature_weight must be a number >= 0")):
    with pytest.raises(ValueError, match=message):
      build("minilm", **{field: value})


def _config(method, student, teacher, **fields):
  config = quickstart.get_config()
  config.dataset, config.num_classes, config.method = "cifar100", 100, method
  config.student.model, config.teacher.model = student, teacher
  config[method].update(fields)
  return config


def test_vit_pairs_are_checked_before_training_naming_the_taps_that_exist():
  """jax.eval_shape of the full-depth models, no compilation."""
  check_method_fits_models(_config("minilm", "vit_tiny", "vit_small"))  # v2, 12 heads: fits.
  with pytest.raises(ConfigError, match=r"config.minilm.student_layer=-1 \(tap 'query12'\) has "
                                        r"shape \(2, 3, 65, 64\) and config.minilm.teacher_layer="
                                        r"-1 \(tap 'query12'\) has shape \(2, 6, 65, 64\): "
                                        r"version 'v1'"):
    check_method_fits_models(_config("minilm", "vit_tiny", "vit_small", version="v1"))
  # The feature methods' tap lookup lists the ViT's taps.
  with pytest.raises(ConfigError, match=r"config.fitnet.student_tap='stage3': the student model "
                                        r"has no such tap; its taps: attention1, attention10, "
                                        r"attention11, attention12, attention2, .*block1, .*"
                                        r"embedding, key1, .*query9, value1, .*value9\."):
    check_method_fits_models(_config("fitnet", "vit_tiny", "vit_small", student_tap="stage3",
                                     teacher_tap="embedding"))


def _random_variables(module, inputs, seed):
  """numpy-drawn variables of the module's shapes (compiling the ViT's init takes seconds)."""
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.normal(size=shape.shape).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.05 * noise)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_three_train_steps_distil_vit_small_into_vit_tiny():
  student = models.get_model("vit_tiny", num_classes=10, depth=1)
  teacher = models.get_model("vit_small", num_classes=10, depth=1)
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  student_variables = _random_variables(student, inputs, 1)
  teacher_variables = _random_variables(teacher, inputs, 2)
  method = build("minilm", ce_weight=0.0, kd_weight=0.0)  # The MiniLMv2 term alone.
  optimizer = optax.adam(3e-3)
  train_state = state_lib.create(student_variables=student_variables, method_params={},
                                 method_state={}, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  step = jax.jit(lambda s, t, b: step_lib.make_train_step(
      student_apply=models.apply_fn(student), teacher_apply=models.apply_fn(teacher),
      method=method, optimizer=optimizer)(s, t, b, OPS))
  batch = {"inputs": inputs, "labels": jnp.arange(4, dtype=jnp.int32)}
  history = []
  for _ in range(3):
    train_state, metrics = step(train_state, teacher_variables, batch)
    history.append(float(metrics["minilm"]))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(train_state.step) == 3
  assert history[0] > 0 and history[2] < history[0], history
  np.testing.assert_allclose(float(metrics["loss"]), history[2], rtol=1e-6)
