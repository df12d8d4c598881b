"""DINO: the EMA teacher with a known momentum, the loss and centre against float64 numpy on
hand-made views, identical state on every replica (simulated pmap), crops as a pure function
of (seed, step, example), the weighted k-NN, and the train step on MNIST-1D and ViT shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.methods import Batch, base
from kdjax.methods import dino as dino_lib
from kdjax.models.output import Output
from kdjax.teachers import choose as teachers_choose
from kdjax.train import state as state_lib, step as step_lib
from methods_helpers import PMAP_AXIS, build, simulated_pmap_ops

OPS = methods.single_device_ops()
SMALL = dict(out_dim=8, hidden_dim=16, bottleneck_dim=4, local_crops=1, knn_bank_size=16,
             num_train_steps=100, teacher_warmup_steps=10)
VIEWS = ("global0", "global1", "local0")


def small_dino(**overrides):
  return build("dino", **dict(SMALL, **overrides))


def np_softmax(z):
  z = np.asarray(z, np.float64) - np.max(z, -1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def view_batch(seed, b=8, masked=None, step=3):
  """A Batch whose data holds student Outputs on 3 views and teacher Outputs on the 2 global
  ones, embeddings [b, 5]."""
  rng = np.random.default_rng(seed)
  out = lambda: Output(jnp.asarray(rng.normal(size=(b, 3)), jnp.float32),
                       {"embedding": jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)})
  data = {"index": jnp.arange(b)}
  data.update({base.STUDENT_VIEW_PREFIX + v: out() for v in VIEWS})
  data.update({base.TEACHER_VIEW_PREFIX + v: out() for v in VIEWS[:2]})
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  return Batch(student=out(), teacher=out(), labels=jnp.asarray(rng.integers(0, 3, b)),
               where=jnp.asarray(where), step=jnp.int32(step), rng=jax.random.PRNGKey(seed),
               data=data, student_variables={"params": {"w": jnp.ones((2, 2))}})


def jit_loss(method):
  """method.loss, jitted (Batch is not a pytree: its fields are the arguments)."""
  loss = jax.jit(lambda params, state, student, teacher, labels, where, step, rng, data:
                 method.loss(params, state, Batch(student, teacher, labels, where, step,
                                                  rng=rng, data=data), OPS))
  return lambda params, state, b: loss(params, state, b.student, b.teacher, b.labels, b.where,
                                       b.step, b.rng, b.data)


# One method and its jitted init and loss, shared by the tests (one compilation each).
METHOD = small_dino()
LOSS = jit_loss(METHOD)
_INIT = jax.jit(lambda student, variables: METHOD.init(jax.random.PRNGKey(0), Batch(
    student, student, None, None, None, student_variables=variables)))


def init(method, batch):
  assert method is METHOD
  params, state = _INIT(batch.student, batch.student_variables)
  state = dict(state, center=jnp.asarray(np.random.default_rng(9).normal(size=8), jnp.float32))
  return params, state


def test_ema_update_with_a_known_momentum_and_the_schedules():
  method = small_dino()
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  teacher = {"params": {"w": normal(3, 2)}, "batch_stats": {"m": normal(2)}}
  student = jax.tree.map(lambda x: x + normal(*x.shape), teacher)
  head, student_head = {"k": normal(4)}, {"k": normal(4)}
  state = {"teacher": jax.tree.map(jnp.asarray, teacher), "teacher_head": head, "x": 1}
  new = method.update_after_step(state, jax.tree.map(jnp.asarray, student), jnp.int32(25),
                                 method_params={"head": student_head})
  m = 1 - (1 - 0.996) * (np.cos(np.pi * 25 / 100) + 1) / 2  # cosine_scheduler(0.996, 1).
  jax.tree.map(lambda got, t, s: np.testing.assert_allclose(got, m * t + (1 - m) * s,
                                                            rtol=1e-6),
               new["teacher"], teacher, student)
  np.testing.assert_allclose(new["teacher_head"]["k"],
                             m * head["k"] + (1 - m) * student_head["k"], rtol=1e-6)
  assert new["x"] == 1
  momentum = lambda s: float(dino_lib.ema_momentum(s, start=0.996, end=1.0, num_steps=100))
  assert momentum(0) == pytest.approx(0.996) and momentum(100) == momentum(500) == 1.0
  temperature = lambda s: float(dino_lib.teacher_temperature(s, start=0.04, end=0.07,
                                                             warmup_steps=10))
  assert [temperature(s) for s in (0, 5, 10, 50)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def np_dino(method, params, state, batch):
  """Loss, centre and bank from the heads' outputs, in float64 numpy (official DINOLoss)."""
  c = method.config
  head = jax.jit(lambda p, x: method._head().apply({"params": p}, x))  # pylint: disable=protected-access
  student = [np.asarray(head(params["head"], batch.data[base.STUDENT_VIEW_PREFIX + v]
                             .features["embedding"]), np.float64) for v in VIEWS]
  teacher = [np.asarray(head(state["teacher_head"], batch.data[base.TEACHER_VIEW_PREFIX + v]
                             .features["embedding"]), np.float64) for v in VIEWS[:2]]
  where = np.asarray(batch.where)
  temperature = 0.04 + 0.03 * int(batch.step) / 10
  center = np.asarray(state["center"], np.float64)
  total, pairs = 0.0, 0
  for iq, t in enumerate(teacher):
    q = np_softmax((t - center) / temperature)
    for v, s in enumerate(student):
      if v != iq:
        total = total - np.sum(q * np.log(np_softmax(s / c.student_temperature)), -1)
        pairs += 1
  loss = np.mean((total / pairs)[where])
  new_center = 0.9 * center + 0.1 * np.concatenate([t[where] for t in teacher]).mean(0)
  embedding = np.asarray(batch.teacher.features["embedding"], np.float64)
  return loss, new_center, embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)


def test_loss_centre_and_bank_match_numpy():
  method = METHOD
  masked = np.zeros(8, bool)
  masked[[2, 5]] = True
  batch = view_batch(0, masked=masked)
  params, state = init(method, batch)
  loss_fn = LOSS
  loss, metrics, new_state = loss_fn(params, state, batch)
  expected_loss, expected_center, bank = np_dino(method, params, state, batch)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(new_state["center"], expected_center, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_state["bank"][:8], bank, rtol=1e-5)
  labels = np.where(masked, -1, np.asarray(batch.labels))
  np.testing.assert_array_equal(new_state["bank_labels"][:8], labels)
  assert np.all(np.asarray(new_state["bank_labels"][8:]) == -1)
  assert int(new_state["bank_position"]) == 8
  assert float(metrics["teacher_temperature"]) == pytest.approx(0.049)
  # The FIFO wraps: two more batches of 8 in a bank of 16 overwrite the first rows.
  again = loss_fn(params, loss_fn(params, new_state, batch)[2], batch)[2]
  assert int(again["bank_position"]) == 8


def test_simulated_pmap_gives_the_same_loss_and_identical_state_on_every_replica():
  method = METHOD
  masked = np.zeros(8, bool)
  masked[[1, 6]] = True
  batch = view_batch(1, masked=masked)
  params, state = init(method, batch)
  whole_loss, _, whole_state = LOSS(params, state, batch)
  shard = lambda tree: jax.tree.map(lambda x: np.reshape(x, (4, 2) + x.shape[1:]), tree)

  def replica(student, teacher, labels, where, data):
    b = Batch(student, teacher, labels, where, batch.step, rng=batch.rng, data=data)
    loss, _, new_state = method.loss(params, state, b, simulated_pmap_ops())
    return loss, new_state

  losses_r, states_r = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      shard(batch.student), shard(batch.teacher), shard(batch.labels), shard(batch.where),
      shard(batch.data))
  np.testing.assert_allclose(losses_r, [whole_loss] * 4, rtol=1e-5)
  for key, value in whole_state.items():
    if key in ("teacher", "teacher_head"):
      continue
    for r in range(4):
      np.testing.assert_allclose(states_r[key][r], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_crops_are_a_pure_function_of_rng_and_example_index():
  method = small_dino(local_crops=2)
  signals = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)), jnp.float32)
  batch = {"inputs": signals, "index": jnp.arange(10, 16)}
  views, again, part, other_step = jax.jit(lambda batch: (
      method.views(batch, jax.random.PRNGKey(3)), method.views(batch, jax.random.PRNGKey(3)),
      method.views({"inputs": batch["inputs"][2:4], "index": batch["index"][2:4]},
                   jax.random.PRNGKey(3)),
      method.views(batch, jax.random.PRNGKey(4))))(batch)
  assert sorted(views) == ["global0", "global1", "local0", "local1"]
  for name, view in views.items():
    assert view.shape == signals.shape
    np.testing.assert_array_equal(view, again[name])
    np.testing.assert_allclose(part[name], view[2:4], atol=1e-5)  # Whatever the device split.
  assert not np.allclose(views["global0"], views["global1"])
  assert not np.allclose(other_step["local0"], views["local0"])
  # A crop of the whole signal is the signal; an image crop stays within the input's range.
  crop = dino_lib.random_resized_crop
  draws = np.random.default_rng(1).uniform(size=(6, 4)).astype(np.float32)
  images = np.random.default_rng(2).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  # draws[:, 2] places the window: 0 starts it at the signal's start, 1 ends it at its end.
  half_draws = np.array([[0.5, 0, 0, 0], [0.5, 0, 1, 0]], np.float32)
  whole, half, image_crop = jax.jit(lambda signals, images: (
      crop(signals, draws, (1.0, 1.0)), crop(signals[:2], half_draws, (0.5, 0.5)),
      crop(images, draws[:2], (0.05, 0.4))))(signals, images)
  np.testing.assert_allclose(whole, signals, atol=1e-5)
  half = np.asarray(half)
  signals_np = np.asarray(signals)  # Output j samples the input at start*40 + j/2 - 1/4.
  np.testing.assert_allclose(half[0, 1:-1:2], signals_np[0, :19] * 0.75
                             + signals_np[0, 1:20] * 0.25, atol=1e-5)
  np.testing.assert_allclose(half[1, ::2], signals_np[1, 19:39] * 0.25
                             + signals_np[1, 20:40] * 0.75, atol=1e-5)
  assert image_crop.shape == images.shape
  assert float(image_crop.min()) >= 0 and float(image_crop.max()) <= 1
  assert not np.allclose(image_crop, images)


def test_knn_matches_the_official_weighted_vote():
  rng = np.random.default_rng(0)
  normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  bank, query = normalise(rng.normal(size=(30, 4))), normalise(rng.normal(size=(5, 4)))
  labels = rng.integers(0, 3, 30)
  labels[[0, 7, 9]] = -1  # Empty rows.
  knn = jax.jit(dino_lib.knn_predict, static_argnames=("num_classes", "k", "temperature"))
  got = knn(query.astype(np.float32), bank.astype(np.float32), labels, num_classes=3, k=5,
            temperature=0.07)
  expected = []
  for q in query:
    similarity = np.where(labels >= 0, bank @ q, -np.inf)
    top = np.argsort(-similarity)[:5]
    votes = np.zeros(3)
    for row in top:
      votes[labels[row]] += np.exp(similarity[row] / 0.07)
    expected.append(np.argmax(votes))
  np.testing.assert_array_equal(got, expected)


def _mlp_step(method, inputs):
  model = models.get_model("mlp", num_classes=10)
  apply = models.apply_fn(model)
  b = inputs.shape[0]

  optimizer = optax.adam(1e-3)

  @jax.jit
  def init(inputs):
    variables = models.init_variables(model, jax.random.key(0), inputs)
    output = apply(variables, inputs, train=False)[0]
    params, method_state = method.init(jax.random.PRNGKey(0), Batch(
        output, output, jnp.zeros(b, jnp.int32), jnp.ones(b, bool), jnp.int32(0),
        student_variables=variables))
    return state_lib.create(student_variables=variables, method_params=params,
                            method_state=method_state, optimizer=optimizer,
                            rng=jax.random.PRNGKey(0))

  train_state = init(inputs)
  step = step_lib.make_train_step(student_apply=apply, teacher_apply=None, method=method,
                                  optimizer=optimizer)
  return apply, train_state, step


def test_train_step_runs_views_moves_the_ema_teacher_and_eval_scores_knn():
  method = small_dino(local_crops=0)
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(8, 40)), jnp.float32)
  apply, train_state, step = _mlp_step(method, inputs)
  batch = {"inputs": inputs, "labels": jnp.arange(8) % 3, "index": jnp.arange(8)}
  new_state, metrics = jax.jit(lambda s, b: step(s, None, b, OPS))(train_state, batch)
  assert np.isfinite(float(metrics["dino"])) and float(metrics["dino"]) > 0
  ema = lambda t, old, s: np.testing.assert_allclose(
      t, 0.996 * np.asarray(old) + 0.004 * np.asarray(s), rtol=1e-5, atol=1e-7)
  jax.tree.map(ema, new_state.method_state["teacher"], train_state.method_state["teacher"],
               state_lib.student_variables(new_state))
  jax.tree.map(ema, new_state.method_state["teacher_head"],
               train_state.method_state["teacher_head"], new_state.params["method"]["head"])
  assert int(new_state.method_state["bank_position"]) == 8
  eval_step = step_lib.make_eval_step(
      student_apply=apply, metrics=method.eval_metrics(),
      teacher=teachers_choose.for_evaluation(method, student_apply=apply))
  sums = jax.jit(eval_step)(new_state, None, dict(batch, mask=np.ones(8, bool)))
  # The bank holds these very examples (by the teacher before the step): nearly all right.
  assert 6 <= float(sums["knn_accuracy"]) <= 8 and float(sums["count"]) == 8


@pytest.mark.slow
def test_vit_tiny_train_step_traces_on_32x32_images():
  method = small_dino()
  model = models.get_model("vit_tiny", num_classes=10)
  apply = models.apply_fn(model)
  inputs = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def one_step(x):
    variables = models.init_variables(model, jax.random.key(0), x)
    output = apply(variables, x, train=False)[0]
    params, method_state = method.init(jax.random.PRNGKey(0), Batch(
        output, output, jnp.zeros(2, jnp.int32), jnp.ones(2, bool), jnp.int32(0),
        student_variables=variables))
    optimizer = optax.sgd(0.1)
    train_state = state_lib.create(student_variables=variables, method_params=params,
                                   method_state=method_state, optimizer=optimizer,
                                   rng=jax.random.PRNGKey(0))
    step = step_lib.make_train_step(student_apply=apply, teacher_apply=None, method=method,
                                    optimizer=optimizer)
    return step(train_state, None, {"inputs": x, "labels": jnp.zeros(2, jnp.int32),
                                    "index": jnp.arange(2)}, OPS)[1]

  metrics = jax.eval_shape(one_step, inputs)
  assert metrics["dino"].shape == ()


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.dino.out_dim must be a positive integer"):
    small_dino(out_dim=0)
  with pytest.raises(ValueError, match=r"config.dino.local_crops_scale=\[0.4, 0.05\]: must be "
                                       r"\[low, high\] area fractions"):
    small_dino(local_crops_scale=(0.4, 0.05))
  with pytest.raises(ValueError, match=r"config.dino.momentum_start must be a number in "
                                       r"\[0.0, 1.0\]"):
    small_dino(momentum_start=1.5)
  with pytest.raises(ValueError, match=r"config.dino.tap='nope': the student model has no such "
                                       r"tap; its taps: embedding"):
    small_dino(tap="nope").init(jax.random.PRNGKey(0), view_batch(0))
