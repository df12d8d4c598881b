"""The pure train step: teacher handling, cached teacher outputs, optimizer state contents."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import methods, models
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
