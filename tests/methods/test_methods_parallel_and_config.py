"""DIST on a simulated pmap equals DIST on the whole batch; bad configs name their field."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import methods
from kdjax.methods import Batch
from kdjax.models.output import Output
from methods_helpers import (PMAP_AXIS, build, random_batch, run, simulated_pmap_ops,
                             with_student_logits)

OPS = methods.single_device_ops()
NUM_REPLICAS = 4


def _replica_losses(method, batch, shard_shape):
  """Per-replica (loss, metrics, d loss_r / d local student logits) under the pmap ops."""
  ops = simulated_pmap_ops()
  shard = lambda x: jnp.reshape(x, (NUM_REPLICAS,) + shard_shape + x.shape[1:])
  params, state = method.init(jax.random.PRNGKey(0), batch)

  def replica(student, teacher, labels, where):
    def loss_fn(logits):
      b = Batch(student=Output(logits, {}), teacher=Output(teacher, {}), labels=labels,
                where=where, step=batch.step)
      loss, metrics, _ = method.loss(params, state, b, ops)
      return loss, metrics
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(student)
    return loss, metrics, grad

  return jax.vmap(replica, axis_name=PMAP_AXIS)(
      shard(batch.student.logits), shard(batch.teacher.logits), shard(batch.labels),
      shard(batch.where))


@pytest.mark.parametrize("name", ["dist", "taid", "kd_std"])
def test_simulated_pmap_matches_single_device(name):
  """pmean of the per-replica losses == the whole-batch loss; each replica sees the same
  relational term; replica gradients / R == the whole-batch gradient (as after the step's
  pmean of gradients); TAID's state is identical on every replica."""
  method = build(name, ce_weight=0.5)
  masked = np.zeros(16, bool)
  masked[[3, 9, 10, 15]] = True  # uneven padding across replicas
  batch = random_batch(5, (16, 10), masked=masked, garbage=True)

  # Each side jitted, as the train step runs it: op by op, DIST's loss and gradients under
  # vmap dispatched (and compiled) hundreds of primitives one at a time, ~15 s here.
  loss, metrics, new_state, params = jax.jit(lambda: run(method, batch, OPS))()
  grad = jax.jit(jax.grad(lambda z: method.loss(params, method.init(None, batch)[1],
                                                with_student_logits(batch, z), OPS)[0]))(
                                                    batch.student.logits)
  replica_loss, replica_metrics, replica_grad = jax.jit(
      lambda: _replica_losses(method, batch, (4,)))()

  np.testing.assert_allclose(float(jnp.mean(replica_loss)), float(loss), rtol=1e-5)
  for key in metrics:  # the step pmeans metrics
    np.testing.assert_allclose(float(jnp.mean(replica_metrics[key])), float(metrics[key]),
                               rtol=1e-5, atol=1e-7, err_msg=key)
  if name == "dist":
    np.testing.assert_allclose(np.asarray(replica_metrics["dist"]),
                               np.full(NUM_REPLICAS, float(metrics["dist"])), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(replica_grad).reshape(grad.shape) / NUM_REPLICAS,
                             np.asarray(grad), rtol=1e-4, atol=1e-7)
  if name == "taid":
    _, state0 = method.init(None, batch)

    def replica_state(student, teacher, labels, where):
      b = Batch(student=Output(student, {}), teacher=Output(teacher, {}), labels=labels,
                where=where, step=batch.step)
      return method.loss({}, state0, b, simulated_pmap_ops())[2]

    shard = lambda x: jnp.reshape(x, (NUM_REPLICAS, 4) + x.shape[1:])
    states = jax.jit(jax.vmap(replica_state, axis_name=PMAP_AXIS))(
        shard(batch.student.logits), shard(batch.teacher.logits), shard(batch.labels),
        shard(batch.where))
    for key, value in new_state.items():
      np.testing.assert_allclose(np.asarray(states[key]), np.full(NUM_REPLICAS, value),
                                 rtol=1e-6, err_msg=key)


def test_dist_sees_the_global_batch():
  """Without the gather, per-replica DIST would differ from the global one."""
  method = build("dist")
  batch = random_batch(6, (16, 10))
  dist = lambda b: jax.jit(lambda: run(method, b, OPS)[1]["dist"])()  # Jitted: see above.
  whole = float(dist(batch))
  first_half = Batch(student=Output(batch.student.logits[:4], {}),
                     teacher=Output(batch.teacher.logits[:4], {}), labels=batch.labels[:4],
                     where=batch.where[:4], step=batch.step)
  assert abs(float(dist(first_half)) - whole) > 1e-3


BAD_CONFIGS = [
    ("dist", "beta", -1.0), ("dist", "temperature", 0.0), ("dist", "ce_weight", "a"),
    ("kd_std", "temperature", -2.0), ("kd_std", "kd_weight", -9.0),
    ("nkd", "gamma", -1.5), ("nkd", "temperature", 0.0), ("nkd", "nkd_weight", -1.0),
    ("ctkd", "temperature_range", 0.0), ("ctkd", "temperature_min", -1.0),
    ("ctkd", "curriculum_steps", -1), ("ctkd", "curriculum_steps", 2.5),
    ("ctkd", "lambda_max", -1.0), ("ctkd", "temperature_logit_init", float("nan")),
    ("taid", "t_start", 1.0), ("taid", "t_start", -0.1), ("taid", "t_end", 0.0),
    ("taid", "t_end", 1.5), ("taid", "alpha", 2.0), ("taid", "beta", 1.0),
    ("taid", "num_train_steps", 0), ("taid", "adaptive", 1),
    ("multi_teacher_kd", "weights", (1.0, -1.0)), ("multi_teacher_kd", "temperatures", ()),
    ("multi_teacher_kd", "temperatures", (2.0, 0.0)), ("multi_teacher_kd", "kd_weight", -0.9),
    ("fkl", "temperature", 0.0), ("rkl", "kd_weight", -1.0), ("jsd", "beta", 1.5),
    ("skew_fkl", "alpha", 1.0), ("skew_rkl", "alpha", -0.1), ("tvd", "ce_weight", -1.0),
    ("dist", "temperature", float("nan")),
    ("fitnet", "feature_weight", -1.0), ("at", "p", 0.0), ("rkd", "angle_weight", -50.0),
    ("crd", "nce_k", 0), ("crd", "feat_dim", 1.5), ("crd", "nce_t", 0.0),
]


@pytest.mark.parametrize("name,field,value", BAD_CONFIGS)
def test_bad_config_names_the_field(name, field, value):
  cls = methods.get_method_class(name)
  config = cls.default_config()
  with config.ignore_type():
    config[field] = value
  with pytest.raises(ValueError) as error:
    cls(config)
  message = str(error.value)
  assert f"config.{name}.{field}" in message, message
  assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize("name,fields", [
    ("ctkd", {"lambda_min": 1.0, "lambda_max": 0.5}),
    ("taid", {"t_start": 0.8, "t_end": 0.5}),
])
def test_inconsistent_pairs_are_rejected(name, fields):
  with pytest.raises(ValueError, match=rf"config\.{name}\.{list(fields)[1]}"):
    build(name, **fields)


def test_defaults_build_through_the_registry():
  for name, cls in methods.METHODS.items():
    config = ml_collections.ConfigDict({"method": name, name: cls.default_config()})
    assert isinstance(methods.build_method(config), cls)


def test_multi_teacher_checks_teacher_count():
  method = build("multi_teacher_kd", weights=(0.5, 0.5))
  with pytest.raises(ValueError, match=r"config\.multi_teacher_kd\.weights.*3 teachers"):
    run(method, random_batch(0, num_teachers=3))
  with pytest.raises(ValueError, match=r"N_teachers"):
    run(method, random_batch(0))  # a single, unstacked teacher
  # One temperature for all and uniform weights work for any N; a float is accepted too.
  run(build("multi_teacher_kd", temperatures=(2.0,)), random_batch(0, num_teachers=2))
  run(_float_temperature_method(), random_batch(0, num_teachers=2))


def _float_temperature_method():
  cls = methods.get_method_class("multi_teacher_kd")
  config = cls.default_config()
  with config.ignore_type():
    config.temperatures = 2.0
  return cls(config)


def test_pmap_mean_is_the_global_mean_on_every_replica_with_the_pmean_gradient():
  values = jnp.arange(12.0).reshape(4, 3)
  where = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
  global_mean = float(jnp.sum(values * where) / jnp.sum(where))
  ops = simulated_pmap_ops()
  value, grad = jax.vmap(jax.value_and_grad(lambda v, w: ops.mean(v, w)),
                         axis_name=PMAP_AXIS)(values, where)
  np.testing.assert_allclose(value, [global_mean] * 4, rtol=1e-6)  # One meaning everywhere.
  # Averaging the replicas' gradients (the step's pmean) gives d(global mean)/d(values).
  np.testing.assert_allclose(grad / 4, where / jnp.sum(where), rtol=1e-6)


@pytest.mark.parametrize("name,field", [("kd", "temperature"), ("kd", "ce_weight"),
                                        ("crd", "nce_k")])
def test_a_bool_is_not_a_number(name, field):
  """Python's True == 1 passes isinstance(int): a config built from a dict (not through a
  float field, which would coerce it) must still be refused."""
  cls = methods.get_method_class(name)
  values = cls.default_config().to_dict()
  values[field] = True
  with pytest.raises(ValueError, match=rf"config\.{name}\.{field} must be a .*, got True"):
    cls(ml_collections.ConfigDict(values))
