"""The pure train step: teacher handling, cached teacher outputs, optimizer state contents."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.teachers import choose as teachers_choose
from kdjax.teachers import keys as teacher_keys
from kdjax.train import state as state_lib, step as step_lib


def _setup(method_name="kd"):
  student = models.get_model("mlp", num_classes=10)
  teacher = models.get_model("cnn1d", num_classes=10)
  inputs = jax.random.normal(jax.random.key(0), (8, 40))
  student_variables = models.init_variables(student, jax.random.key(1), inputs)
  teacher_variables = models.init_variables(teacher, jax.random.key(2), inputs)
  method_class = methods.get_method_class(method_name)
  method = method_class(method_class.default_config())
  optimizer = optax.sgd(0.1, momentum=0.9)
  train_state = state_lib.create(student_variables=student_variables, method_params={},
                                 method_state={}, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  batch = {"inputs": inputs, "labels": jnp.arange(8) % 10}
  return student, teacher, teacher_variables, method, optimizer, train_state, batch


def test_teacher_is_not_in_the_optimizer_state():
  student, teacher, teacher_variables, method, optimizer, train_state, batch = _setup()
  pure_step = step_lib.make_train_step(
      student_apply=models.apply_fn(student), teacher_apply=models.apply_fn(teacher),
      method=method, optimizer=optimizer)
  step = jax.jit(lambda s, t, b: pure_step(s, t, b, methods.single_device_ops()))
  new_state, metrics = step(train_state, teacher_variables, batch)
  student_leaves = len(jax.tree.leaves(train_state.params))
  momentum_leaves = len(jax.tree.leaves(new_state.opt_state))
  assert momentum_leaves == student_leaves  # SGD momentum: one trace per student parameter.
  assert jnp.isfinite(metrics["loss"]) and metrics["kd"] > 0
  assert int(new_state.step) == 1


def test_cached_teacher_logits_replace_running_the_teacher():
  student, teacher, teacher_variables, method, optimizer, train_state, batch = _setup()
  teacher_apply = models.apply_fn(teacher)
  logits, _ = teacher_apply(teacher_variables, batch["inputs"], train=False)

  def must_not_run(*args, **kwargs):
    raise AssertionError("the teacher ran although its logits were cached")

  ops = methods.single_device_ops()
  cached_step = step_lib.make_train_step(student_apply=models.apply_fn(student),
                                         teacher_apply=must_not_run, method=method,
                                         optimizer=optimizer)
  live_step = step_lib.make_train_step(student_apply=models.apply_fn(student),
                                       teacher_apply=teacher_apply, method=method,
                                       optimizer=optimizer)
  cached_state, cached = cached_step(train_state, None,
                                     dict(batch, teacher_logits=logits.logits), ops)
  live_state, live = live_step(train_state, teacher_variables, batch, ops)
  np.testing.assert_allclose(cached["loss"], live["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               cached_state.params, live_state.params)


def test_teacher_gets_no_gradient_even_if_the_step_is_differentiated_through():
  student, teacher, teacher_variables, method, optimizer, train_state, batch = _setup()
  step = step_lib.make_train_step(student_apply=models.apply_fn(student),
                                  teacher_apply=models.apply_fn(teacher), method=method,
                                  optimizer=optimizer)

  def loss_of_teacher(variables):
    _, metrics = step(train_state, variables, batch, methods.single_device_ops())
    return metrics["loss"]

  grads = jax.grad(loss_of_teacher)(teacher_variables)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_train_and_eval_steps_compile_once_per_run(monkeypatch, tmp_path, data_dir):
  """A whole run (40 steps, logging, 3 evaluations with a padded last batch, checkpoints)
  traces its train step and its eval step once each: chex raises on a second trace."""
  import chex
  from configs import quickstart
  from kdjax.train import loop

  for factory in ("make_train_step", "make_eval_step"):
    original = getattr(step_lib, factory)
    monkeypatch.setattr(step_lib, factory, lambda *a, _original=original, **k:
                        chex.assert_max_traces(_original(*a, **k), n=1))
  config = quickstart.get_config("smoke")
  config.method, config.suite, config.progress, config.data_dir = "fitnet", "", False, data_dir
  config.teacher.model = "mlp"  # Trained below: the teacher of the distilled run.
  config.eval_batch_size = 300  # 1000 test examples: the last batch is padded.
  teacher = loop.train_and_evaluate(_as_scratch(config), str(tmp_path / "t"))
  assert teacher["steps"] == 40
  chex.clear_trace_counter()  # Counted per function definition: the next run starts at 0.
  config.validation_examples = 500  # Model selection on examples held out of training.
  summary = loop.train_and_evaluate(config, str(tmp_path / "s"),
                                    teacher_checkpoints=[str(tmp_path / "t" / "checkpoints")])
  assert np.isfinite(summary["final_train_loss"])
  lines = [json.loads(l) for l in open(tmp_path / "s" / "metrics.jsonl")]
  validation = [l for l in lines if l["split"] == "validation"]
  assert [l["step"] for l in validation] == [20, 40]  # Every eval_every_steps, and the end.
  assert [l["step"] for l in lines if l["split"] == "eval"] == [40]  # The test split: once.
  assert summary["best_validation_accuracy"] == max(l["accuracy"] for l in validation)
  assert summary["best_validation_step"] in (20, 40) and "best_eval_accuracy" not in summary


def _as_scratch(config):
  scratch = config.copy_and_resolve_references()
  scratch.method = "scratch"
  return scratch


class _SeesData(methods.Method):
  """Reports what the step hands a method beyond the outputs: data['index'] and rng."""
  name = "sees_data"
  teacher_needs = methods.base.TeacherNeeds(kind="none")

  def loss(self, params, state, batch, ops):
    ce = methods.base.cross_entropy(batch, ops)
    return ce, {"index_sum": jnp.sum(batch.data["index"]).astype(jnp.float32),
                "rng_bits": jax.random.bits(batch.rng).astype(jnp.float32),
                "data_keys": jnp.float32(len(batch.data))}, state


def test_batch_data_and_rng_reach_the_method():
  student, _, _, _, _, train_state, batch = _setup()
  ops = methods.single_device_ops()
  step = jax.jit(functools.partial(step_lib.make_train_step(
      student_apply=models.apply_fn(student), teacher_apply=None, method=_SeesData({}),
      optimizer=optax.sgd(0.1)), ops=ops))
  batch = dict(batch, index=jnp.arange(100, 108, dtype=jnp.int32))
  state1, metrics1 = step(train_state, None, batch)
  _, metrics2 = step(state1, None, batch)
  assert float(metrics1["index_sum"]) == sum(range(100, 108))
  assert float(metrics1["data_keys"]) == 1.0  # inputs / labels / mask are not repeated there.
  assert float(metrics1["rng_bits"]) != float(metrics2["rng_bits"])  # Folded by step.


def test_training_batches_carry_each_examples_index(data_dir):
  from kdjax.data import InputPipeline
  pipeline = InputPipeline("mnist1d", global_batch_size=16, seed=0, data_dir=data_dir)
  indices = np.concatenate([pipeline.train_batch(s)["index"] for s in range(250)])
  assert indices.dtype == np.int32
  # One epoch (4000 examples = 250 batches of 16) visits every example exactly once.
  np.testing.assert_array_equal(np.sort(indices), np.arange(4000))


def test_eval_step_sums_every_metric_given_and_the_teachers():
  student, teacher, teacher_variables, _, _, train_state, batch = _setup()
  student_apply, teacher_apply = models.apply_fn(student), models.apply_fn(teacher)

  def margin(eval_batch):  # A method's own metric: summed over unmasked rows like the rest.
    top2 = jax.lax.top_k(eval_batch.student.logits, 2)[0]
    return {"margin": jnp.sum((top2[:, 0] - top2[:, 1]) * eval_batch.where)}

  eval_step = jax.jit(step_lib.make_eval_step(
      student_apply=student_apply, teacher_apply=teacher_apply,
      metrics=(*step_lib.CLASSIFICATION_METRICS, margin)))
  mask = np.arange(8) < 6
  sums = eval_step(train_state, teacher_variables, dict(batch, mask=mask))
  assert set(sums) == {"count", "accuracy", "cross_entropy", "margin", "teacher_accuracy",
                       "teacher_agreement", "teacher_cross_entropy", "teacher_overlap"}
  s = np.asarray(student_apply(state_lib.student_variables(train_state), batch["inputs"],
                               train=False)[0].logits)[:6]
  t = np.asarray(teacher_apply(teacher_variables, batch["inputs"], train=False)[0].logits)[:6]
  labels = np.asarray(batch["labels"])[:6]
  top2 = np.sort(s, -1)[:, -2:]
  np.testing.assert_allclose(sums["margin"], np.sum(top2[:, 1] - top2[:, 0]), rtol=1e-5)
  assert sums["count"] == 6
  assert sums["accuracy"] == np.sum(s.argmax(-1) == labels)
  assert sums["teacher_agreement"] == np.sum(s.argmax(-1) == t.argmax(-1))
  assert sums["teacher_accuracy"] == np.sum(t.argmax(-1) == labels)
  t_log_probs = t - np.log(np.sum(np.exp(t - t.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - t.max(-1, keepdims=True)
  np.testing.assert_allclose(sums["teacher_cross_entropy"],
                             -np.sum(t_log_probs[np.arange(6), labels]), rtol=1e-5)
  # sum_v min(p_t, p_s) = 1 - total variation, in float64.
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.sum(
      np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)
  overlap = np.minimum(softmax(t.astype(np.float64)), softmax(s.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(sums["teacher_overlap"], np.sum(overlap), rtol=1e-5)
  np.testing.assert_allclose(overlap, 1 - 0.5 * np.abs(softmax(t.astype(np.float64)) -
                                                       softmax(s.astype(np.float64))).sum(-1))


def test_best_eval_is_the_highest_accuracy_and_the_earliest_on_ties():
  from kdjax.train.loop import best_eval
  lines = [{"split": "train", "step": 5, "accuracy": 0.99},
           {"split": "eval", "step": 10, "accuracy": 0.5},
           {"split": "eval", "step": 20, "accuracy": 0.7},
           {"split": "eval", "step": 30, "accuracy": 0.7},
           {"split": "eval", "step": 40, "accuracy": 0.6}]
  assert best_eval(lines) == (20, 0.7)


def test_a_topk_cache_trains_kd_as_sparse_kd_and_feature_taps_come_from_the_cache():
  from kdjax import losses
  from kdjax.methods.base import check_teacher_cache
  from kdjax.validation import ConfigError
  student, teacher, teacher_variables, method, optimizer, train_state, batch = _setup()
  ops = methods.single_device_ops()
  teacher_logits = models.apply_fn(teacher)(teacher_variables, batch["inputs"],
                                            train=False)[0].logits
  values, indices = jax.lax.top_k(teacher_logits, 3)
  cached = dict(batch, teacher_topk_logits=values, teacher_topk_indices=indices,
                **{"teacher_features/embedding": jnp.ones((8, 5))})
  seen = {}

  class Probe(type(method)):
    def loss(self, params, state, b, ops):
      seen["features"], seen["data"] = set(b.teacher.features), set(b.data)
      return super().loss(params, state, b, ops)

  step = step_lib.make_train_step(student_apply=models.apply_fn(student), teacher_apply=None,
                                  method=Probe(method.config), optimizer=optimizer)
  _, metrics = step(train_state, None, cached, ops)
  assert np.isfinite(metrics["loss"]) and metrics["kd"] > 0
  assert seen == {"features": {"embedding"}, "data": set()}
  output = teacher_keys.outputs_from_batch(cached, num_classes=10)
  student_logits = jax.random.normal(jax.random.key(5), (8, 10))
  np.testing.assert_allclose(losses.kd(student_logits, output.logits, temperature=4.0),
                             losses.sparse_kd(student_logits, values, indices, temperature=4.0),
                             rtol=1e-5)
  # Which methods can learn from which cache: refused in one line naming what is missing.
  check_teacher_cache(method, topk=3, num_classes=10)
  dkd = methods.get_method_class("dkd")(methods.get_method_class("dkd").default_config())
  with pytest.raises(ConfigError, match=r"top-3 of 10 logits, but method 'dkd' needs all 10"):
    check_teacher_cache(dkd, topk=3, num_classes=10)
  check_teacher_cache(dkd, topk=None, num_classes=10)
  at_class = methods.get_method_class("at")
  with pytest.raises(ConfigError, match=r"method 'at' needs the teacher taps \['stage1', "):
    check_teacher_cache(at_class(at_class.default_config()), topk=None, num_classes=10,
                        feature_taps=["embedding"])


def test_several_teachers_carry_every_teachers_features():
  from kdjax.teachers.live import ensemble_apply_fn
  inputs = jnp.ones((3, 40))
  teachers = [models.get_model(name, num_classes=10) for name in ("mlp", "cnn1d")]
  variables = [models.init_variables(m, jax.random.key(i), inputs)
               for i, m in enumerate(teachers)]
  output, _ = ensemble_apply_fn([models.apply_fn(m) for m in teachers])(
      variables, inputs, train=False)
  assert output.logits.shape == (2, 3, 10)
  second = models.apply_fn(teachers[1])(variables[1], inputs, train=False)[0]
  np.testing.assert_array_equal(output.features["teacher1/stage2"], second.features["stage2"])
  assert output.features["teacher0/hidden1"].shape == (3, 100)
  np.testing.assert_array_equal(output.features["embedding"],
                                output.features["teacher0/embedding"])


class _HalfwayTeacher(methods.Method):
  """A self-teacher kept in method state, moved halfway to the student after every step: the
  hooks an EMA teacher uses (teacher variables from state, update after the optimizer step)."""
  name = "halfway_teacher"
  teacher_needs = methods.base.TeacherNeeds(kind="self")

  def init(self, rng, sample):
    return {}, {"teacher": sample.student_variables}

  def teacher_variables_from_state(self, state):
    return state["teacher"]

  def update_after_step(self, state, student_variables, step, *, method_params):
    return {"teacher": jax.tree.map(lambda t, s: 0.5 * t + 0.5 * s, state["teacher"],
                                    student_variables)}

  def loss(self, params, state, batch, ops):
    from kdjax import losses
    kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits), batch.where)
    return kd, {"kd": kd, "teacher_logit_sum": jnp.sum(batch.teacher.logits)}, state


def test_a_self_teacher_runs_from_method_state_and_moves_after_the_step():
  student, _, _, _, optimizer, _, batch = _setup()
  apply = models.apply_fn(student)
  initial = models.init_variables(student, jax.random.key(1), batch["inputs"])
  teacher = jax.tree.map(lambda x: x * 0.5, initial)  # Not the student: KD is non-zero.
  method = _HalfwayTeacher(_HalfwayTeacher.default_config())
  train_state = state_lib.create(student_variables=initial, method_params={},
                                 method_state={"teacher": teacher}, optimizer=optimizer,
                                 rng=jax.random.PRNGKey(0))
  step = step_lib.make_train_step(student_apply=apply, teacher_apply=None, method=method,
                                  optimizer=optimizer)
  new_state, metrics = jax.jit(lambda s, b: step(s, None, b, methods.single_device_ops()))(
      train_state, batch)
  expected_logits = apply(teacher, batch["inputs"], train=False)[0].logits
  np.testing.assert_allclose(metrics["teacher_logit_sum"], jnp.sum(expected_logits), rtol=1e-5)
  assert metrics["kd"] > 0
  new_student = state_lib.student_variables(new_state)
  jax.tree.map(lambda t, old, s: np.testing.assert_allclose(t, 0.5 * old + 0.5 * s, rtol=1e-6),
               new_state.method_state["teacher"], teacher, new_student)
  sums = step_lib.make_eval_step(
      student_apply=apply, teacher=teachers_choose.for_evaluation(method, student_apply=apply))(
                                     new_state, None, dict(batch, mask=np.ones(8, bool)))
  assert "teacher_agreement" in sums
