"""CS-KD (class-wise self-knowledge distillation) against a float64 numpy reference."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_python
from kdjax import models
from kdjax.data import InputPipeline, pairing
from kdjax.methods import Batch, cs_kd, single_device_ops
from kdjax.models.output import Output
from kdjax.train import parallel as parallel_lib
from kdjax.train import state as state_lib, step as step_lib
from kdjax.validation import ConfigError
from tests.methods.methods_helpers import PMAP_AXIS, build, np_log_softmax, simulated_pmap_ops

B, C = 8, 5


def paired_batch(seed, *, where=None, garbage=False, rows=None):
  """A hand-made class-paired batch: rows 4..7 are the partners of rows 0..3."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, C)) * 2
  labels = rng.integers(0, C, size=B // 2)
  labels = np.concatenate([labels, labels]).astype(np.int32)
  where = np.ones(B, bool) if where is None else np.asarray(where)
  if garbage:
    logits[~where] = np.nan
  rows = pairing.partner_rows(B) if rows is None else rows
  return Batch(student=Output(jnp.asarray(logits, jnp.float32), {}), teacher=None,
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.asarray(0, jnp.int32), rng=jax.random.key(0),
               data={pairing.PARTNER_ROW_KEY: jnp.asarray(rows), "index": jnp.arange(B)})


def loss_and_metrics(method, logits, labels, where, rows, ops=None):
  """`method.loss` on a paired batch given by its arrays: differentiable in `logits`."""
  batch = Batch(Output(logits, {}), None, labels, where, jnp.zeros((), jnp.int32),
                data={pairing.PARTNER_ROW_KEY: rows})
  loss, metrics, _ = method.loss({}, {}, batch, ops or single_device_ops())
  return loss, metrics


def arrays(batch):
  return (batch.student.logits, batch.labels, batch.where, batch.data[pairing.PARTNER_ROW_KEY])


def jitted_loss(method, batch):
  """(loss, metrics), and the gradient in the logits, jitted: eager dispatch of each small op
  is slower than compiling the whole loss once."""
  (loss, metrics), grad = jax.jit(jax.value_and_grad(
      lambda *a: loss_and_metrics(method, *a), has_aux=True))(*arrays(batch))
  return loss, metrics, np.asarray(grad, np.float64)


def reference(logits, labels, rows, anchors, *, temperature=4.0, kd_weight=1.0,
              ce_weight=1.0):
  """float64: CE on the anchors + kd_weight T^2 KL(p(partner) || p(anchor)), both averaged
  over the anchors (alinlab/cs-kd train.py's KDLoss: sum over classes and anchors / n)."""
  logits = np.asarray(logits, np.float64)
  ce = -np.take_along_axis(np_log_softmax(logits), np.asarray(labels)[:, None], -1)[:, 0]
  log_p = np_log_softmax(logits / temperature)
  log_q = log_p[rows]  # The partner's softened prediction, a constant target.
  kl = np.sum(np.exp(log_q) * (log_q - log_p), -1) * temperature**2
  ce, kl = ce[anchors].mean(), kl[anchors].mean()
  return ce_weight * ce + kd_weight * kl, ce, kl


def test_loss_matches_a_float64_reference_and_the_gradient_reaches_only_the_anchors():
  method = build("cs_kd", kd_weight=0.7, temperature=3.0)
  batch = paired_batch(0)
  rows = np.asarray(batch.data[pairing.PARTNER_ROW_KEY])
  anchors = np.arange(B) < B // 2
  loss, metrics, grad = jitted_loss(method, batch)
  want, want_ce, want_kl = reference(batch.student.logits, batch.labels, np.maximum(rows, 0),
                                     anchors, temperature=3.0, kd_weight=0.7)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], want_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["kd"], want_kl, rtol=1e-5)
  assert want_kl > 0.05
  # d/dz of CE + w T^2 KL(q || softmax(z/T)) = softmax(z) - y + w T (softmax(z/T) - q), per anchor.
  z = np.asarray(batch.student.logits, np.float64)
  p, p_t = np.exp(np_log_softmax(z)), np.exp(np_log_softmax(z / 3.0))
  onehot = np.eye(C)[np.asarray(batch.labels)]
  expected = (p - onehot + 0.7 * 3.0 * (p_t - p_t[np.maximum(rows, 0)])) / 4
  np.testing.assert_allclose(grad[:4], expected[:4], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grad[4:], 0)  # The partners are targets only.


def test_the_direction_is_kl_of_the_partner_from_the_anchor():
  method = build("cs_kd", ce_weight=0.0, temperature=1.0)
  batch = paired_batch(1)
  _, metrics, _ = jitted_loss(method, batch)
  log_p = np_log_softmax(np.asarray(batch.student.logits))
  forward = np.mean(np.sum(np.exp(log_p[4:]) * (log_p[4:] - log_p[:4]), -1))
  backward = np.mean(np.sum(np.exp(log_p[:4]) * (log_p[:4] - log_p[4:]), -1))
  np.testing.assert_allclose(metrics["kd"], forward, rtol=1e-5)
  assert abs(forward - backward) > 1e-3  # The test tells the two directions apart.


def test_where_equals_slicing_out_the_pairs():
  # Row 1 (an anchor) is padding; row 6 (partner of anchor 2) is padding: pairs 1 and 2 drop.
  where = np.ones(B, bool)
  where[[1, 6]] = False
  method = build("cs_kd")
  masked = paired_batch(2, where=where, garbage=True)
  loss, metrics, grad = jitted_loss(method, masked)
  keep = np.array([0, 3, 4, 7])  # Anchors 0 and 3 with their partners 4 and 7.
  full = paired_batch(2)
  sliced = Batch(Output(full.student.logits[keep], {}), None, full.labels[keep],
                 jnp.ones(4, bool), full.step,
                 data={pairing.PARTNER_ROW_KEY: jnp.asarray([2, 3, -1, -1], jnp.int32)})
  want, _, _ = jitted_loss(method, sliced)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], float(np.mean(
      np.argmax(np.asarray(full.student.logits)[[0, 3]], -1) == np.asarray(full.labels)[[0, 3]])))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[[1, 2, 4, 5, 6, 7]] == 0)


def test_simulated_pmap_finds_partners_on_other_replicas_and_gives_the_same_loss_and_grad():
  # 4 replicas of 2 rows: the anchors live on replicas 0-1, their partners on replicas 2-3.
  method = build("cs_kd", temperature=2.0)
  batch = paired_batch(3)

  def replica(*replica_arrays):
    return loss_and_metrics(method, *replica_arrays, ops=simulated_pmap_ops())[0]

  shard = lambda x: jnp.reshape(x, (4, 2) + x.shape[1:])
  losses, grads = jax.jit(jax.vmap(jax.value_and_grad(replica), axis_name=PMAP_AXIS))(
      *map(shard, arrays(batch)))
  want, _, want_grad = jitted_loss(method, batch)
  np.testing.assert_allclose(losses, [want] * 4, rtol=1e-5)
  # Each replica's gradient is the global one of its rows times the replica count (the step
  # then averages over replicas): the anchors' rows carry it, the partners' rows none.
  np.testing.assert_allclose(np.reshape(grads, (B, C)) / 4, want_grad, rtol=1e-4, atol=1e-7)
  assert np.abs(want_grad[:4]).max() > 1e-3


def test_config_and_batch_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"config.cs_kd.kd_weight"):
    build("cs_kd", kd_weight=-1.0)
  with pytest.raises(ConfigError, match=r"config.cs_kd.temperature"):
    build("cs_kd", temperature=0.0)
  unpaired = paired_batch(0)
  unpaired = Batch(unpaired.student, None, unpaired.labels, unpaired.where, unpaired.step,
                   data={"index": jnp.arange(B)})
  with pytest.raises(ConfigError, match=r"Method 'cs_kd' needs class-paired batches with "
                                        r"'partner_row'.*'class_pairs' sampler"):
    build("cs_kd").loss({}, {}, unpaired, single_device_ops())


def test_defaults_and_the_batch_key_agree_with_the_pipeline():
  config = build("cs_kd").config
  assert (config.ce_weight, config.kd_weight, config.temperature) == (1.0, 1.0, 4.0)
  assert cs_kd.PARTNER_ROW_KEY == pairing.PARTNER_ROW_KEY
  assert cs_kd.CSKD.sampler in pairing.SAMPLERS and cs_kd.CSKD.teacher_needs.kind == "none"


@pytest.mark.slow  # 40 compiled steps on MNIST-1D: about 3 s alone, more on a busy machine.
def test_the_real_train_step_learns_from_class_paired_mnist1d_batches(data_dir):
  pipeline = InputPipeline("mnist1d", global_batch_size=64, seed=0, data_dir=data_dir,
                           sampler="class_pairs")
  parallel = parallel_lib.get_parallel("jit")
  student = models.get_model("mlp", num_classes=10)
  apply = models.apply_fn(student)
  first = pipeline.train_batch(0)
  variables = models.init_variables(student, jax.random.key(0), first["inputs"][:2])
  logits = np.asarray(apply(variables, first["inputs"], train=True, rng=None)[0].logits)
  method = build("cs_kd")
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = parallel.put_replicated(state_lib.create(
      student_variables=variables, method_params={}, method_state={}, optimizer=optimizer,
      rng=jax.random.PRNGKey(0)))
  train_step = parallel.compile_train_step(step_lib.make_train_step(
      student_apply=apply, teacher_apply=None, method=method, optimizer=optimizer,
      reduce_gradients=parallel.reduce_gradients))
  history = []
  for step in range(40):
    state, metrics = train_step(state, None, parallel.put_batch(pipeline.train_batch(step)))
    history.append(parallel_lib.metrics_to_host(parallel, metrics))
  # Step 0 is the method's loss on the student's outputs for the whole paired batch.
  rows = first[pairing.PARTNER_ROW_KEY]
  want, want_ce, want_kd = reference(logits, first["labels"], np.maximum(rows, 0), rows >= 0)
  np.testing.assert_allclose([history[0][k] for k in ("loss", "ce", "kd")],
                             [want, want_ce, want_kd], rtol=1e-4)
  assert all(np.isfinite(h["loss"]) for h in history)
  assert np.mean([h["ce"] for h in history[-5:]]) < 0.9 * history[0]["ce"]  # It learns.


# 3 steps of the real step on class-paired MNIST-1D batches; prints the losses as JSON.
_MULTIDEVICE_SCRIPT = """
import json, sys
import jax, optax
from kdjax import methods, models
from kdjax.data import InputPipeline
from kdjax.train import parallel as parallel_lib, state as state_lib, step as step_lib
parallel = parallel_lib.get_parallel(sys.argv[2])
pipeline = InputPipeline("mnist1d", global_batch_size=32, seed=0, data_dir=sys.argv[1],
                         sampler="class_pairs")
student = models.get_model("mlp", num_classes=10)
variables = models.init_variables(student, jax.random.key(0), pipeline.train_batch(0)["inputs"])
method = methods.get_method_class("cs_kd")(methods.get_method_class("cs_kd").default_config())
optimizer = optax.sgd(0.1, momentum=0.9)
state = parallel.put_replicated(state_lib.create(
    student_variables=variables, method_params={}, method_state={}, optimizer=optimizer,
    rng=jax.random.PRNGKey(0)))
train_step = parallel.compile_train_step(step_lib.make_train_step(
    student_apply=models.apply_fn(student), teacher_apply=None, method=method,
    optimizer=optimizer, reduce_gradients=parallel.reduce_gradients))
losses = []
for step in range(3):
  state, metrics = train_step(state, None, parallel.put_batch(pipeline.train_batch(step)))
  metrics = parallel_lib.metrics_to_host(parallel, metrics)
  losses.append([metrics["loss"], metrics["kd"]])
print(json.dumps(losses))
"""


@pytest.mark.slow  # Three fresh processes (8 forced host devices): 1-2 minutes.
def test_eight_devices_under_jit_and_pmap_give_the_single_device_losses(data_dir):
  def losses(parallel, devices):
    result = run_python(["-c", _MULTIDEVICE_SCRIPT, data_dir, parallel], env_extra={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}, timeout=600)
    return np.array(json.loads(result.stdout.strip().splitlines()[-1]))

  one = losses("jit", 1)
  assert np.all(np.isfinite(one)) and np.all(one[:, 1] > 0)
  for parallel in ("jit", "pmap"):  # Anchors on devices 0-3, their partners on 4-7.
    np.testing.assert_allclose(losses(parallel, 8), one, rtol=2e-5, err_msg=parallel)
