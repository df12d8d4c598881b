"""BYOT: the loss against its documented combination in float64 numpy, the deepest exit taught
by the labels only, masks equal slicing, exit taps and per-exit eval metrics; the quickstart
launcher runs byot and dino (slow)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import methods
from kdjax.methods import Batch, base
from kdjax.models.output import Output
from methods_helpers import build, np_log_softmax

OPS = methods.single_device_ops()


def jit_init(method, student, key=0):
  return jax.jit(lambda student: method.init(jax.random.PRNGKey(key), Batch(
      student, None, jnp.zeros(student.logits.shape[:1], jnp.int32),
      jnp.ones(student.logits.shape[:1], bool), jnp.int32(0))))(student)


def byot_batch(seed, b=6, masked=None, garbage=False):
  rng = np.random.default_rng(seed)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  features = {"stage1": rng.normal(size=(b, 8, 4)), "stage2": rng.normal(size=(b, 4, 4)),
              "stage3": rng.normal(size=(b, 2, 4)),
              "embedding": np.maximum(rng.normal(size=(b, 6)), 0)}
  logits = rng.normal(size=(b, 3)) * 2
  labels = rng.integers(0, 3, b)
  if garbage:
    for value in features.values():
      value[~where] = np.nan
    logits[~where] = np.inf
    labels[~where] = -100
  return Batch(student=Output(jnp.asarray(logits, jnp.float32),
                              {k: jnp.asarray(v, jnp.float32) for k, v in features.items()}),
               teacher=None, labels=jnp.asarray(labels, jnp.int32), where=jnp.asarray(where),
               step=jnp.int32(0))


def np_byot(logits, labels, exits, deepest_features, c):
  """The documented combination, float64, every row selected."""
  logits = np.asarray(logits, np.float64)
  ce = lambda z: -np.mean(np.take_along_axis(np_log_softmax(z), labels[:, None], -1))
  total = c["ce_weight"] * ce(logits)
  t = c["temperature"]
  log_t = np_log_softmax(logits / t)
  for features, exit_logits in exits:
    exit_logits = np.asarray(exit_logits, np.float64)
    kd = t**2 * np.mean(np.sum(np.exp(log_t) * (log_t - np_log_softmax(exit_logits / t)), -1))
    f = np.asarray(features, np.float64)
    active = (f > 0) | (deepest_features > 0)
    hint = np.mean(np.sum((f - deepest_features) ** 2 * active, -1))
    total += c["ce_weight"] * ce(exit_logits) + c["kd_weight"] * kd + c["feature_weight"] * hint
  return total


def test_loss_is_the_documented_combination_the_deepest_exit_learns_from_labels_masks_slice():
  method = build("byot", feature_weight=0.01)
  batch = byot_batch(0)
  masked = np.array([False, True, False, False, True, False])
  garbage = byot_batch(0, masked=masked, garbage=True)  # NaN / inf / -100 in padding rows.
  keep = ~masked
  sliced = Batch(Output(batch.student.logits[keep],
                        {k: v[keep] for k, v in batch.student.features.items()}), None,
                 batch.labels[keep], jnp.ones(int(keep.sum()), bool), batch.step)
  params, state = jit_init(method, batch.student)
  assert sorted(params) == ["exit_stage1", "exit_stage2"]  # 'auto': every stage but the last.
  # Kernel = stride = the tap's length over the smallest (stage3's 2): 4 and 2, as the
  # official 8 / 4 / 2 on 32x32 ResNet stages.
  assert params["exit_stage1"]["downsample"]["kernel"].shape[0] == 4
  assert params["exit_stage2"]["downsample"]["kernel"].shape[0] == 2
  c = method.config

  @jax.jit
  def run(params, logits, embedding):
    loss_of = lambda z, f: method.loss(params, state, Batch(
        Output(z, dict(batch.student.features, embedding=f)), None, batch.labels, batch.where,
        batch.step), OPS)
    ce_of = lambda z: c.ce_weight * base.cross_entropy(
        Batch(Output(z, {}), None, batch.labels, batch.where, batch.step), OPS)
    on = lambda p, b: method.loss(p, state, b, OPS)[0]
    return (loss_of(logits, embedding)[:2], method.exits(params, batch.student),
            jax.grad(lambda z, f: loss_of(z, f)[0], argnums=(0, 1))(logits, embedding),
            jax.grad(ce_of)(logits),
            (on(params, garbage), on(params, sliced), jax.grad(on)(params, garbage)))

  (loss, metrics), exits, student_grad, ce_grad, (masked_loss, sliced_loss, grads) = run(
      params, batch.student.logits, batch.student.features["embedding"])
  expected = np_byot(batch.student.logits, np.asarray(batch.labels), list(exits.values()),
                     np.asarray(batch.student.features["embedding"], np.float64),
                     dict(ce_weight=c.ce_weight, kd_weight=c.kd_weight,
                          temperature=c.temperature, feature_weight=c.feature_weight))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics["hint"] > 0 and metrics["kd"] > 0
  # The deepest exit is the teacher: its logits and features get only the CE gradient.
  np.testing.assert_allclose(student_grad[0], ce_grad, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(student_grad[1]) == 0)
  # Masks equal slicing, and garbage in padding rows reaches no gradient.
  np.testing.assert_allclose(masked_loss, sliced_loss, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_exit_taps_auto_explicit_and_errors():
  batch = byot_batch(2)
  mlp_like = {"hidden1": jnp.ones((2, 5)), "hidden2": jnp.ones((2, 5)),
              "embedding": jnp.ones((2, 5))}
  resnet_like = {"stem": 1, "stage1": 1, "stage1_preact": 1, "stage2": 1, "stage3": 1,
                 "embedding": 1}
  method = build("byot")
  assert method.exit_taps(mlp_like) == ["hidden1"]
  assert method.exit_taps(resnet_like) == ["stage1", "stage2"]
  assert build("byot", exit_taps="stage3, stage1").exit_taps(batch.student.features) == [
      "stage3", "stage1"]
  with pytest.raises(ValueError, match=r"config.byot.exit_taps='auto': the student has no "
                                       r"stage<k> or hidden<k> taps.*its taps: block1, "
                                       r"embedding"):
    method.exit_taps({"block1": 1, "embedding": 1})
  with pytest.raises(ValueError, match=r"config.byot.exit_taps='stage9': the student model "
                                       r"has no such tap; its taps: embedding, stage1"):
    build("byot", exit_taps="stage9").init(jax.random.PRNGKey(0), byot_batch(0))
  with pytest.raises(ValueError, match=r"config.byot.exit_taps='': use 'auto'"):
    build("byot", exit_taps="")
  with pytest.raises(ValueError, match=r"config.byot.kd_weight must be a number >= 0"):
    build("byot", kd_weight=-1.0)


def test_eval_step_reports_every_exit_and_the_ensemble_from_method_params():
  from kdjax import models
  from kdjax.train import state as state_lib, step as step_lib
  import optax
  model = models.get_model("mlp", num_classes=10, hidden_sizes=(16, 16, 16))
  apply = models.apply_fn(model)
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(8, 40)), jnp.float32)
  method = build("byot")

  @jax.jit
  def init(inputs):
    variables = models.init_variables(model, jax.random.key(0), inputs)
    output = apply(variables, inputs, train=False)[0]
    params, method_state = method.init(jax.random.PRNGKey(3), Batch(
        output, None, jnp.zeros(8, jnp.int32), jnp.ones(8, bool), jnp.int32(0)))
    train_state = state_lib.create(student_variables=variables, method_params=params,
                                   method_state=method_state, optimizer=optax.sgd(0.1),
                                   rng=jax.random.PRNGKey(0))
    return train_state, output, method.exits(params, output)

  train_state, output, exits = init(inputs)
  assert sorted(exits) == ["hidden1", "hidden2"]
  labels = np.arange(8) % 10
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  sums = jax.jit(step_lib.make_eval_step(student_apply=apply, teacher_apply=None,
                                         metrics=method.eval_metrics()))(
                                             train_state, None,
                                             {"inputs": inputs, "labels": labels, "mask": mask})
  probs = np.exp(np_log_softmax(output.logits))
  for tap, (_, logits) in exits.items():
    np.testing.assert_allclose(sums[f"exit_{tap}_accuracy"],
                               np.sum((np.argmax(logits, -1) == labels) * mask))
    probs = probs + np.exp(np_log_softmax(logits))
  np.testing.assert_allclose(sums["exit_ensemble_accuracy"],
                             np.sum((np.argmax(probs, -1) == labels) * mask))
  assert sorted(sums) == ["count", "exit_ensemble_accuracy", "exit_hidden1_accuracy",
                          "exit_hidden2_accuracy"]


@pytest.mark.slow
def test_quickstart_launcher_runs_byot_and_dino(tmp_path, data_dir):
  from conftest import run_python
  run_python(["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
              f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
              "--config.suite=byot,dino", "--config.dino.out_dim=64",
              "--config.dino.hidden_dim=64", "--config.dino.local_crops=2"])
  with open(os.path.join(tmp_path, "summary.json")) as f:
    runs = json.load(f)["runs"]
  assert list(runs) == ["byot", "dino"]
  for run in runs.values():
    assert np.isfinite(run["final_train_loss"])
  assert 0.0 <= runs["byot"]["eval_exit_hidden1_accuracy"] <= 1.0
  assert 0.0 <= runs["byot"]["eval_exit_ensemble_accuracy"] <= 1.0
  assert 0.0 <= runs["dino"]["eval_knn_accuracy"] <= 1.0
