"""ps_kd, tf_kd, tf_kd_reversed and ema_teacher against float64 numpy, masks, replicas, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, validation
from kdjax.methods import Batch
from kdjax.models.output import Output
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib
from methods_helpers import PMAP_AXIS, build, np_log_softmax, simulated_pmap_ops

OPS = methods.single_device_ops()
N, C = 12, 4  # Training examples, classes.


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def _loss(method, state, batch, ops=OPS):
  """method.loss compiled once (eager dispatch of each op costs more on shared CPUs)."""
  return jax.jit(lambda s: method.loss({}, s, batch, ops))(state)


def _ps_kd(**overrides):
  method = build("ps_kd", **dict(dict(alpha_T=0.8, num_steps=30, steps_per_epoch=3),
                                 **overrides))
  method.prepare(methods.base.RunFacts(num_train_examples=N))
  return method


def _batch(seed, index, *, step=0, where=None, garbage=False):
  rng = np.random.default_rng(seed)
  b = len(index)
  logits = (rng.normal(size=(b, C)) * 2).astype(np.float32)
  labels = rng.integers(0, C, size=b).astype(np.int32)
  where = np.ones(b, bool) if where is None else np.asarray(where)
  if garbage:
    logits[~where] = np.nan
    labels[~where] = -100
  return Batch(student=Output(jnp.asarray(logits), {}), teacher=None,
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.asarray(step, jnp.int32), data={"index": jnp.asarray(index, jnp.int32)})


def _known_state(seed=7):
  rng = np.random.default_rng(seed)
  history = np_softmax(rng.normal(size=(N, C))).astype(np.float32)
  seen = rng.random(N) < 0.6
  return {"history": jnp.asarray(history), "seen": jnp.asarray(seen)}


def _np_ps_kd(state, batch, alpha):
  """The official train loop's loss and stored predictions, in float64."""
  index = np.asarray(batch.data["index"])
  where = np.asarray(batch.where)
  logits = np.asarray(batch.student.logits, np.float64)[where]
  labels = np.asarray(batch.labels)[where]
  onehot = np.eye(C)[labels]
  previous = np.asarray(state["history"], np.float64)[index][where]
  seen = np.asarray(state["seen"])[index][where]
  targets = np.where(seen[:, None], (1 - alpha) * onehot + alpha * previous, onehot)
  loss = (-targets * np_log_softmax(logits)).sum(-1).mean()  # .mean(0).sum()
  history = np.asarray(state["history"], np.float64).copy()
  history[index[where]] = np_softmax(logits)
  seen_after = np.asarray(state["seen"]).copy()
  seen_after[index[where]] = True
  return loss, history, seen_after


def test_ps_kd_loss_and_history_for_a_known_history():
  method = _ps_kd()
  state = _known_state()
  batch = _batch(0, [3, 0, 7, 11, 5, 2], step=7)  # Epoch 2 of 10: alpha = 0.8 * 3 / 10.
  loss, metrics, new_state = _loss(method, state, batch)
  expected_loss, history, seen = _np_ps_kd(state, batch, 0.24)
  np.testing.assert_allclose(metrics["alpha"], 0.24, rtol=1e-6)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(new_state["history"], history, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(new_state["seen"], seen)


def test_ps_kd_first_epoch_targets_are_one_hot():
  method = _ps_kd()
  _, state = method.init(jax.random.PRNGKey(0), _batch(0, [0, 1]))
  assert state["history"].shape == (N, C) and not np.any(state["seen"])
  batch = _batch(1, [4, 9, 1])
  loss, _, new_state = _loss(method, state, batch)
  labels = np.asarray(batch.labels)
  ce = -np.take_along_axis(np_log_softmax(batch.student.logits), labels[:, None], 1).mean()
  np.testing.assert_allclose(loss, ce, rtol=1e-5)
  np.testing.assert_array_equal(np.flatnonzero(new_state["seen"]), [1, 4, 9])


def test_ps_kd_where_equals_slicing_and_padding_writes_nothing():
  method = _ps_kd()
  state = _known_state()
  where = np.array([1, 0, 1, 1, 0, 1], bool)
  # Padding rows carry NaN logits, -100 labels and the index of a real example (2), as a
  # padded last batch may.
  index = [3, 2, 7, 11, 2, 5]
  batch = _batch(2, index, step=4, where=where, garbage=True)
  loss_fn = jax.jit(jax.value_and_grad(
      lambda logits, s: method.loss({}, s, Batch(
          Output(logits, {}), None, batch.labels, batch.where, batch.step, data=batch.data),
          OPS)[0]))
  value, grad = loss_fn(batch.student.logits, state)
  sliced = _batch(2, np.asarray(index)[where], step=4)
  sliced = Batch(Output(batch.student.logits[where], {}), None, batch.labels[where],
                 jnp.ones(int(where.sum()), bool), batch.step,
                 data={"index": sliced.data["index"]})
  sliced_loss, _, sliced_state = _loss(method, state, sliced)
  np.testing.assert_allclose(value, sliced_loss, rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)
  _, _, new_state = _loss(method, state, batch)
  for key in ("history", "seen"):
    np.testing.assert_array_equal(new_state[key], sliced_state[key], err_msg=key)
  np.testing.assert_array_equal(new_state["history"][2], state["history"][2])


def test_ps_kd_repeated_example_stores_its_last_occurrence():
  method = _ps_kd()
  batch = _batch(3, [6, 1, 6, 0])  # Example 6 twice (a batch straddling two epochs).
  _, _, new_state = _loss(method, _known_state(), batch)
  np.testing.assert_allclose(new_state["history"][6], np_softmax(batch.student.logits[2]),
                             rtol=1e-5)


def test_ps_kd_history_is_identical_on_every_replica():
  method = _ps_kd()
  state = _known_state()
  replicas, local = 4, 3
  index = np.array([0, 5, 9, 1, 4, 10, 2, 8, 6, 11, 3, 7])
  batch = _batch(4, index, step=13)
  whole_loss, _, whole_state = _loss(method, state, batch)
  shard = lambda x: jnp.reshape(x, (replicas, local) + x.shape[1:])

  def replica(logits, labels, where, rows):
    b = Batch(Output(logits, {}), None, labels, where, batch.step, data={"index": rows})
    loss, _, new_state = method.loss({}, state, b, simulated_pmap_ops())
    return loss, new_state

  losses_r, states_r = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      shard(batch.student.logits), shard(batch.labels), shard(batch.where),
      shard(batch.data["index"]))
  np.testing.assert_allclose(losses_r, [whole_loss] * replicas, rtol=1e-5)
  for r in range(replicas):
    np.testing.assert_array_equal(states_r["history"][r], states_r["history"][0])
    np.testing.assert_array_equal(states_r["seen"][r], whole_state["seen"])
    np.testing.assert_allclose(states_r["history"][r], whole_state["history"], rtol=1e-6)
  # Every example of the global batch was written on every replica, not only its own rows.
  assert np.all(np.asarray(states_r["seen"]))


def _np_kl_div_mean(log_input, target):
  """PyTorch's nn.KLDivLoss() (reduction 'mean'): the mean over all B * C elements."""
  return float(np.mean(target * (np.log(target) - log_input)))


def test_tf_kd_virtual_is_the_official_loss_kd_regularization():
  method = build("tf_kd")  # ce 0.9, kd 10 = reg_alpha 0.1 * multiplier 100, T 20, a 0.99.
  batch = _batch(5, np.arange(6))
  loss, metrics, _ = _loss(method, {}, batch)
  logits, labels = np.asarray(batch.student.logits, np.float64), np.asarray(batch.labels)
  teacher_soft = np.full((6, C), (1 - 0.99) / (C - 1))
  teacher_soft[np.arange(6), labels] = 0.99
  ce = -np.take_along_axis(np_log_softmax(logits), labels[:, None], 1).mean()
  regu = _np_kl_div_mean(np_log_softmax(logits), np_softmax(teacher_soft / 20)) * 100
  np.testing.assert_allclose(loss, 0.9 * ce + 0.1 * regu, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)


def test_tf_kd_reversed_is_the_official_loss_kd():
  method = build("tf_kd_reversed")  # alpha 0.6, T 20.
  batch = _batch(6, np.arange(5))
  teacher = np.random.default_rng(9).normal(size=(5, C)) * 3
  batch = Batch(batch.student, Output(jnp.asarray(teacher, jnp.float32), {}), batch.labels,
                batch.where, batch.step)
  loss, _, _ = _loss(method, {}, batch)
  logits, labels, t = np.asarray(batch.student.logits, np.float64), np.asarray(batch.labels), 20
  ce = -np.take_along_axis(np_log_softmax(logits), labels[:, None], 1).mean()
  d_kl = _np_kl_div_mean(np_log_softmax(logits / t), np_softmax(teacher / t)) * t * t
  np.testing.assert_allclose(loss, 0.4 * ce + 0.6 * d_kl, rtol=1e-5)


def test_which_methods_load_a_teacher():
  get = methods.get_method_class
  assert get("ps_kd").teacher_needs.kind == get("tf_kd").teacher_needs.kind == "none"
  assert get("tf_kd_reversed").teacher_needs.kind == "one"
  assert get("ema_teacher").teacher_needs.kind == "self"


def _linear_apply(variables, inputs, *, train, rng=None):
  """A tiny model with params and a BatchNorm-like running mean (cheaper to compile than an
  MLP): logits = (x - mean) @ w + b; in train mode the running mean moves to the batch's."""
  del rng
  mean = variables["batch_stats"]["mean"]
  logits = (inputs - mean) @ variables["params"]["w"] + variables["params"]["b"]
  if not train:
    return Output(logits, {}), {}
  return Output(logits, {}), {"batch_stats": {"mean": 0.5 * mean + 0.5 * inputs.mean(0)}}


def test_ema_teacher_moves_by_the_scheduled_momentum_inside_the_jitted_step():
  rng = np.random.default_rng(11)
  inputs = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  initial = {"params": {"w": jnp.asarray(rng.normal(size=(6, 10)), jnp.float32),
                        "b": jnp.zeros(10)},
             "batch_stats": {"mean": jnp.zeros(6)}}
  apply = _linear_apply
  method = build("ema_teacher", momentum=0.9, momentum_end=1.0, num_steps=4)
  sample = Batch(student=Output(jnp.zeros((8, 10)), {}), teacher=None,
                 labels=jnp.zeros(8, jnp.int32), where=jnp.ones(8, bool),
                 step=jnp.zeros((), jnp.int32), student_variables=initial)
  _, method_state = method.init(jax.random.PRNGKey(0), sample)
  optimizer = optax.sgd(0.5)
  train_state = state_lib.create(student_variables=initial, method_params={},
                                 method_state=method_state, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: step_lib.make_train_step(
      student_apply=apply, teacher_apply=None, method=method, optimizer=optimizer)(
          s, None, b, OPS), donate_argnums=0)
  batch = {"inputs": inputs, "labels": jnp.arange(8) % 10}
  teacher = jax.tree.map(lambda x: np.asarray(x, np.float64), initial)
  for k in range(2):
    train_state, metrics = step(train_state, batch)
    # DINO's cosine_scheduler(0.9, 1, ...) at iteration k of 4.
    m = 1.0 + 0.5 * (0.9 - 1.0) * (1 + np.cos(np.pi * k / 4))
    np.testing.assert_allclose(metrics["momentum"], m, rtol=1e-6)
    current = state_lib.student_variables(train_state)
    teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * np.asarray(s, np.float64), teacher,
                           current)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7),
                 train_state.method_state["teacher"], teacher)
  # The loss's teacher is the EMA: KD is zero at step 0 only (teacher = student there).
  assert metrics["kd"] > 0


def test_ema_teacher_loss_is_ce_plus_kd_against_the_teacher_logits():
  method = build("ema_teacher", ce_weight=0.3, kd_weight=2.0, temperature=2.0)
  batch = _batch(8, np.arange(6))
  teacher = np.random.default_rng(10).normal(size=(6, C))
  batch = Batch(batch.student, Output(jnp.asarray(teacher, jnp.float32), {}), batch.labels,
                batch.where, batch.step)
  loss, _, _ = _loss(method, {}, batch)
  logits, labels = np.asarray(batch.student.logits, np.float64), np.asarray(batch.labels)
  ce = -np.take_along_axis(np_log_softmax(logits), labels[:, None], 1).mean()
  p_t = np_softmax(teacher / 2)
  kd = 4 * (p_t * (np.log(p_t) - np_log_softmax(logits / 2))).sum(-1).mean()
  np.testing.assert_allclose(loss, 0.3 * ce + 2.0 * kd, rtol=1e-5)


@pytest.mark.parametrize("name,field,value,message", [
    ("ps_kd", "alpha_T", 1.5, r"config\.ps_kd\.alpha_T"),
    ("ps_kd", "steps_per_epoch", 0, r"config\.ps_kd\.steps_per_epoch"),
    ("tf_kd", "correct_prob", 1.0, r"config\.tf_kd\.correct_prob"),
    ("tf_kd_reversed", "temperature", 0.0, r"config\.tf_kd_reversed\.temperature"),
    ("ema_teacher", "schedule", "linear", r"config\.ema_teacher\.schedule='linear' is not "
                                          r"valid.*valid values: constant, cosine"),
    ("ema_teacher", "momentum", 1.2, r"config\.ema_teacher\.momentum"),
])
def test_config_errors_name_the_field(name, field, value, message):
  with pytest.raises(validation.ConfigError, match=message):
    build(name, **{field: value})


def test_missing_inputs_are_explained():
  with pytest.raises(ValueError, match="num_train_examples"):
    build("ps_kd").init(jax.random.PRNGKey(0), _batch(0, [0]))
  with pytest.raises(ValueError, match="Batch.student_variables"):
    build("ema_teacher").init(jax.random.PRNGKey(0), _batch(0, [0]))
