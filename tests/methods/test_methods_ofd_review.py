"""OFD and ReviewKD methods: the loss is the documented combination (checked against float64
numpy re-computations of the connector, the ABF modules and the losses, written from the
official code), masked rows change nothing, one device equals a simulated pmap, the BatchNorm
state moves as PyTorch's would, and config / tap / shape mistakes fail naming what to fix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import methods
from kdjax.methods import Batch
from kdjax.models.output import Output
from methods_helpers import PMAP_AXIS, build, np_cross_entropy, simulated_pmap_ops

OPS = methods.single_device_ops()
EPS = 1e-5  # BatchNorm epsilon (PyTorch's default)


def make_batch(seed, student_shapes, teacher_shapes, *, b=4, masked=None, step=0,
               teacher_variables=None):
  """Logits [b, 5]; taps 's{k}' / 't{k}' of the given per-example shapes."""
  rng = np.random.default_rng(seed)
  taps = lambda prefix, shapes, scale: {
      f"{prefix}{k}": (rng.normal(size=(b,) + shape) * scale).astype(np.float32)
      for k, shape in enumerate(shapes)}
  s_features, t_features = taps("s", student_shapes, 1.0), taps("t", teacher_shapes, 1.5)
  s_logits = rng.normal(size=(b, 5)).astype(np.float32)
  t_logits = rng.normal(size=(b, 5)).astype(np.float32) * 2
  labels = rng.integers(0, 5, size=b).astype(np.int32)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  if masked is not None:  # Padding rows hold garbage.
    for tree in (s_features, t_features):
      for value in tree.values():
        value[~where] = np.nan
    s_logits[~where], labels[~where] = np.inf, -100
  as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return Batch(student=Output(jnp.asarray(s_logits), as_jnp(s_features)),
               teacher=Output(jnp.asarray(t_logits), as_jnp(t_features)),
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.asarray(step, jnp.int32), teacher_variables=teacher_variables)


def select(batch):
  keep = np.asarray(batch.where)
  pick = lambda tree: {k: jnp.asarray(np.asarray(v)[keep]) for k, v in tree.items()}
  return Batch(student=Output(jnp.asarray(np.asarray(batch.student.logits)[keep]),
                              pick(batch.student.features)),
               teacher=Output(jnp.asarray(np.asarray(batch.teacher.logits)[keep]),
                              pick(batch.teacher.features)),
               labels=jnp.asarray(np.asarray(batch.labels)[keep]),
               where=jnp.ones(int(keep.sum()), bool), step=batch.step,
               teacher_variables=batch.teacher_variables)


def jit_loss(method, batch, ops=OPS):
  """method.loss compiled (op-by-op dispatch is far slower), batch arrays as arguments."""
  def loss(params, state, student, teacher, labels, where, step):
    return method.loss(params, state, Batch(
        student=student, teacher=teacher, labels=labels, where=where, step=step,
        teacher_variables=batch.teacher_variables), ops)
  compiled = jax.jit(loss)
  return lambda params, state, b=batch: compiled(params, state, b.student, b.teacher, b.labels,
                                                 b.where, b.step)


def fast_init(method, batch, seed):
  """Random params of `method.init`'s shapes (BatchNorm scales near 1, so every parameter
  matters) and its initial state (running mean 0, variance 1), without compiling the init:
  traced with `jax.eval_shape`. `test_initialisation` (slow) checks the real init."""
  rng = np.random.default_rng(seed)
  params, state = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), batch))

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    value = {"'scale'": 1.0 + 0.3 * rng.normal(size=x.shape), "'mean'": np.zeros(x.shape),
             "'var'": np.ones(x.shape)}.get(name[name.rfind("["):][1:-1],
                                           0.5 * rng.normal(size=x.shape))
    return jnp.asarray(value, jnp.float32)

  return (jax.tree_util.tree_map_with_path(fill, params),
          jax.tree_util.tree_map_with_path(fill, state))


# --- float64 numpy re-computations -------------------------------------------------------


def np_batch_norm(x, bn, where):
  """Training-mode BatchNorm over the selected rows (biased variance, as PyTorch normalises)."""
  x = np.asarray(x, np.float64)
  rows = x[where]
  mean, var = rows.mean(axis=(0, 1, 2)), rows.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + EPS) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])


def np_conv(x, kernel, bias=None):
  """Stride-1 conv with symmetric zero padding k // 2; kernel [k, k, C_in, C_out] (HWIO)."""
  kernel = np.asarray(kernel, np.float64)
  k = kernel.shape[0]
  pad = np.pad(np.asarray(x, np.float64), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(pad[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))
  return out if bias is None else out + np.asarray(bias)


def np_margin(scale, bias):
  out = []
  for g, m in zip(np.asarray(scale, np.float64), np.asarray(bias, np.float64)):
    s = abs(g)
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))
    out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m
               if cdf > 0.001 else -3 * s)
  return np.array(out)


def np_ofd(s, t, margin):
  target = np.maximum(t, margin)
  active = (s > target) | (target > 0)
  return (active * (s - target) ** 2).reshape(len(s), -1).sum(1)


def np_resize(x, size):
  h, w = x.shape[1:3]
  rows = (np.arange(size[0]) * h) // size[0]
  cols = (np.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


def np_pool(x, out):
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    for j in range(out):
      y[:, i, j] = x[:, (i * h) // out:math.ceil((i + 1) * h / out),
                     (j * w) // out:math.ceil((j + 1) * w / out)].mean(axis=(1, 2))
  return y


def np_hcl(s, t):
  mse = lambda a, b: ((a - b) ** 2).reshape(len(a), -1).mean(1)
  loss, cnt, tot = mse(s, t), 1.0, 1.0
  for level in (4, 2, 1):
    if level < s.shape[1]:
      cnt /= 2.0
      loss, tot = loss + cnt * mse(np_pool(s, level), np_pool(t, level)), tot + cnt
  return loss / tot


def np_review(params, students, teachers, where):
  """The official ReviewKD forward (ABFs from the deepest stage) and hcl, per example."""
  n = len(students)
  fused, residual = [None] * n, None
  for k in reversed(range(n)):
    p = params[f"abf{k}"]
    x = np_batch_norm(np_conv(students[k], p["conv1"]["kernel"]), p["bn1"], where)
    if k < n - 1:
      y = np_resize(residual, x.shape[1:3])
      z = np_conv(np.concatenate([x, y], -1), p["att_conv"]["kernel"], p["att_conv"]["bias"])
      z = 1 / (1 + np.exp(-z))
      x = x * z[..., :1] + y * z[..., 1:]
    if x.shape[1:3] != teachers[k].shape[1:3]:
      x = np_resize(x, teachers[k].shape[1:3])
    fused[k] = np_batch_norm(np_conv(x, p["conv2"]["kernel"]), p["bn2"], where)
    residual = x
  return sum(np_hcl(f, np.asarray(t, np.float64)) for f, t in zip(fused, teachers))


# --- OFD ------------------------------------------------------------------------------------

OFD_STUDENT = [(4, 4, 3), (2, 2, 3)]
OFD_TEACHER = [(4, 4, 5), (2, 2, 6)]


def ofd_teacher_variables(seed=20):
  rng = np.random.default_rng(seed)
  bn = lambda c: {"scale": jnp.asarray(rng.uniform(0.3, 2, c) * rng.choice([-1, 1], c),
                                       jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  return {"params": {"block_a": {"bn2": bn(5)}, "block_b": {"bn2": bn(6)}},
          "batch_stats": {}}


def ofd_method(**overrides):
  fields = dict(student_tap="s0,s1", teacher_tap="t0,t1", teacher_bn="block_a/bn2,block_b/bn2")
  fields.update(overrides)
  return build("ofd", **fields)


def ofd_expected(method, params, batch):
  where = np.asarray(batch.where)
  variables = batch.teacher_variables["params"]
  total = 0.0
  for k, path in enumerate(("block_a", "block_b")):
    student = np.nan_to_num(np.asarray(batch.student.features[f"s{k}"], np.float64))
    teacher = np.asarray(batch.teacher.features[f"t{k}"], np.float64)
    p = params[f"connector{k}"]
    connected = np_batch_norm(np_conv(student, p["conv"]["kernel"]), p["bn"], where)
    margin = np_margin(variables[path]["bn2"]["scale"], variables[path]["bn2"]["bias"])
    total += np_ofd(connected[where], teacher[where], margin).mean() / 2 ** (1 - k)
  return total


def np_kd(student, teacher, temperature=4.0):
  log_p = lambda z: np.asarray(z, np.float64) / temperature - np.log(np.exp(
      np.asarray(z, np.float64) / temperature).sum(-1, keepdims=True))
  p_t = np.exp(log_p(teacher))
  return float((temperature ** 2 * (p_t * (log_p(teacher) - log_p(student))).sum(-1)).mean())


def test_ofd_is_the_documented_combination():
  method = ofd_method(kd_weight=0.5)
  batch = make_batch(0, OFD_STUDENT, OFD_TEACHER, teacher_variables=ofd_teacher_variables())
  params, state = fast_init(method, batch, 1)
  loss, metrics, new_state = jit_loss(method, batch)(params, state)
  term = ofd_expected(method, params, batch)
  ce = np_cross_entropy(batch.student.logits, batch.labels)
  kd = np_kd(batch.student.logits, batch.teacher.logits)
  np.testing.assert_allclose(metrics["ofd"], term, rtol=1e-5)
  np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.5 * kd + 1e-3 * term, rtol=1e-6)
  assert term > 1.0 and kd > 0.1  # Not vacuous comparisons.
  # Running statistics move as PyTorch's (momentum 0.1) from mean 0 / var 1.
  student = np.asarray(batch.student.features["s0"], np.float64)
  conv = np_conv(student, params["connector0"]["conv"]["kernel"])
  stats = new_state["batch_stats"]["connector0"]["bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4)


def test_ofd_errors_name_the_field_the_shapes_and_the_fix():
  batch = make_batch(4, [(4, 4, 3)], [(2, 2, 5)], teacher_variables=ofd_teacher_variables())
  method = ofd_method(student_tap="s0", teacher_tap="t0", teacher_bn="block_a/bn2")
  with pytest.raises(ValueError, match=r"config\.ofd\.student_tap='s0' has shape \(4, 4, 4, 3\) "
                                       r"and config\.ofd\.teacher_tap='t0' has shape "
                                       r"\(4, 2, 2, 5\).*connector_kernel_size=1"):
    method.init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match=r"config\.ofd\.student_tap='nope': the student model "
                                       r"has no such tap; its taps: s0"):
    ofd_method(student_tap="nope", teacher_tap="t0", teacher_bn="block_a/bn2").init(
        jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match=r"config\.ofd\.teacher_bn=.*one BatchNorm per teacher "
                                       r"tap"):
    ofd_method(teacher_bn="block_a/bn2")
  with pytest.raises(ValueError, match=r"config\.ofd\.connector_kernel_size must be a positive "
                                       r"odd integer.*got 2"):
    ofd_method(connector_kernel_size=2)
  with pytest.raises(ValueError, match=r"config\.ofd\.teacher_model='nonet' has no "
                                       r"BN_BEFORE_RELU table"):
    ofd_method(teacher_bn="", teacher_model="nonet")
  with pytest.raises(ValueError, match=r"config\.ofd\.student_tap='s0,s1' and "
                                       r"config\.ofd\.teacher_tap='t0'"):
    ofd_method(teacher_tap="t0")

  good = make_batch(5, OFD_STUDENT, OFD_TEACHER, teacher_variables=ofd_teacher_variables())
  params, state = fast_init(ofd_method(), good, 0)
  with pytest.raises(ValueError, match=r"config\.ofd\.teacher_bn: the teacher's params have no "
                                       r"'block_c/bn2' \('block_c' is missing under the top "
                                       r"level; there: block_a, block_b\)"):
    ofd_method(teacher_bn="block_a/bn2,block_c/bn2").loss(params, state, good, OPS)
  with pytest.raises(ValueError, match=r"'block_b/bn2' has scale shape \(6,\) but "
                                       r"config\.ofd\.teacher_tap='t0' has shape \(4, 4, 4, 5\)"):
    ofd_method(teacher_bn="block_b/bn2,block_a/bn2").loss(params, state, good, OPS)
  with pytest.raises(ValueError, match=r"set config\.ofd\.teacher_model.*or list the flax paths "
                                       r"in config\.ofd\.teacher_bn"):
    ofd_method(teacher_bn="").loss(params, state, good, OPS)


def test_ofd_defaults_and_teacher_model_lookup():
  from kdjax.models import cifar_resnet
  config = methods.get_method_class("ofd").default_config()
  assert config.feature_weight == 1e-3 and config.connector_kernel_size == 1
  assert config.teacher_tap == "stage1_preact,stage2_preact,stage3_preact"
  method = build("ofd", teacher_model="resnet32x4")
  table = cifar_resnet.BN_BEFORE_RELU["resnet32x4"]
  assert method.teacher_bn == [table[f"stage{k}_preact"] for k in (1, 2, 3)]
  assert method.teacher_bn[0] == "stage1_block4/bn2"
  with pytest.raises(ValueError, match=r"BN_BEFORE_RELU of 'resnet32x4' has no BatchNorm for "
                                       r"stage3"):
    build("ofd", teacher_model="resnet32x4", teacher_tap="stage1_preact,stage2_preact,stage3")


# --- ReviewKD -------------------------------------------------------------------------------

REVIEW_STUDENT = [(4, 4, 3), (2, 2, 5), (6,)]
REVIEW_TEACHER = [(4, 4, 4), (2, 2, 6), (7,)]
# Two stages (one fusion) are enough where only masks / devices are at stake.
SMALL_STUDENT, SMALL_TEACHER = [(2, 2, 5), (6,)], [(2, 2, 6), (7,)]


def review_method(**overrides):
  fields = dict(student_tap="s0,s1,s2", teacher_tap="t0,t1,t2", warmup_steps=10)
  fields.update(overrides)
  return build("review_kd", **fields)


def review_expected(params, batch):
  where = np.asarray(batch.where)
  as_map = lambda x: x if x.ndim == 4 else x[:, None, None, :]
  students = [as_map(np.nan_to_num(np.asarray(batch.student.features[f"s{k}"], np.float64)))
              for k in range(3)]
  teachers = [as_map(np.asarray(batch.teacher.features[f"t{k}"], np.float64)) for k in range(3)]
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  return np_review(params, students, teachers, where)[where].mean()


def test_review_kd_is_the_documented_combination_with_warmup():
  method = review_method(kd_weight=1.0)
  batch = make_batch(6, REVIEW_STUDENT, REVIEW_TEACHER)
  params, state = fast_init(method, batch, 7)
  assert set(params) == {"abf0", "abf1", "abf2"} and "att_conv" not in params["abf2"]
  term = review_expected(params, batch)
  ce = np_cross_entropy(batch.student.logits, batch.labels)
  kd = np_kd(batch.student.logits, batch.teacher.logits)
  loss_fn = jit_loss(method, batch)
  for step, ramp in ((0, 0.0), (5, 0.5), (10, 1.0), (40, 1.0)):
    b = make_batch(6, REVIEW_STUDENT, REVIEW_TEACHER, step=step)
    loss, metrics, new_state = loss_fn(params, state, b)
    np.testing.assert_allclose(metrics["review_kd"], term, rtol=1e-5)
    np.testing.assert_allclose(metrics["review_kd_warmup"], ramp)
    np.testing.assert_allclose(loss, ce + kd + 5.0 * ramp * term, rtol=1e-5)
  assert term > 0.1
  stats = new_state["batch_stats"]["abf2"]["bn1"]
  assert not np.allclose(stats["mean"], 0)  # The running statistics moved.


def test_review_kd_config_and_tap_errors():
  with pytest.raises(ValueError, match=r"config\.review_kd\.warmup_steps must be an integer >= 0"):
    review_method(warmup_steps=-1)
  with pytest.raises(ValueError, match=r"config\.review_kd\.max_mid_channels"):
    review_method(max_mid_channels=0)
  with pytest.raises(ValueError, match=r"config\.review_kd\.student_tap='s0,s1' and "
                                       r"config\.review_kd\.teacher_tap='t0,t1,t2'"):
    review_method(student_tap="s0,s1")
  batch = make_batch(10, [(4, 4, 3), (2, 5)], [(4, 4, 4), (2, 6)])
  with pytest.raises(ValueError, match=r"config\.review_kd\.student_tap='s1' has shape "
                                       r"\(4, 2, 5\) and config\.review_kd\.teacher_tap='t1' has "
                                       r"shape \(4, 2, 6\): the ABF connectors take"):
    review_method(student_tap="s0,s1", teacher_tap="t0,t1").init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match=r"config\.review_kd\.teacher_tap='t9': the teacher model "
                                       r"has no such tap; its taps: t0, t1"):
    review_method(student_tap="s0", teacher_tap="t9").init(jax.random.PRNGKey(0), batch)
  config = methods.get_method_class("review_kd").default_config()
  assert (config.feature_weight, config.warmup_steps, config.ce_weight) == (5.0, 15640, 1.0)


# --- both: one device equals a simulated pmap; parameter counts on the CIFAR models ----------


@pytest.mark.parametrize("name", ["ofd", "review_kd"])
def test_masked_rows_change_nothing_get_no_gradient_and_pmap_equals_one_device(name):
  """Padding rows (NaN features, inf logits, -100 labels) change neither the loss nor the
  BatchNorm state (the loss on the selected rows alone), get exactly zero gradient, and a
  simulated 2-device pmap gives the numbers of one device."""
  if name == "ofd":
    method, shapes = ofd_method(), (OFD_STUDENT, OFD_TEACHER)
    variables = ofd_teacher_variables()
  else:
    method = review_method(warmup_steps=0, student_tap="s0,s1", teacher_tap="t0,t1")
    shapes, variables = (SMALL_STUDENT, SMALL_TEACHER), None
  masked = np.array([False, True, False, False])
  batch = make_batch(11, *shapes, teacher_variables=variables, masked=masked)
  params, state = fast_init(method, batch, 12)

  def objective(params, student_tap):
    features = dict(batch.student.features, s0=student_tap)
    loss, _, new_state = method.loss(params, state, Batch(
        student=Output(batch.student.logits, features), teacher=batch.teacher,
        labels=batch.labels, where=batch.where, step=batch.step,
        teacher_variables=variables), OPS)
    return loss, new_state

  (loss, new_state), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1),
                                                        has_aux=True))(
      params, batch.student.features["s0"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(np.asarray(grads[1])[masked] == 0) and np.any(np.asarray(grads[1]) != 0)

  alone, _, alone_state = jit_loss(method, select(batch))(params, state)
  np.testing.assert_allclose(loss, alone, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, new_state, alone_state)

  split = lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:])
  ops = simulated_pmap_ops()

  def replica(student, teacher, labels, where):
    return method.loss(params, state, Batch(student=student, teacher=teacher, labels=labels,
                                            where=where, step=batch.step,
                                            teacher_variables=variables), ops)

  replica_losses, _, replica_states = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      jax.tree.map(split, batch.student), jax.tree.map(split, batch.teacher),
      split(batch.labels), split(batch.where))
  np.testing.assert_allclose(replica_losses, [loss, loss], rtol=1e-5)
  jax.tree.map(lambda a, b: close(a[0], b), replica_states, new_state)


def test_parameter_counts_on_resnet32x4_to_resnet8x4():
  from kdjax import models

  def abstract(name):
    module = models.get_model(name, num_classes=100)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: models.apply_fn(module)(
        models.init_variables(module, jax.random.PRNGKey(0), x), x, train=False)[0], x)

  student, teacher = abstract("resnet8x4"), abstract("resnet32x4")
  counts = {}
  for name, method in (("ofd", build("ofd", teacher_model="resnet32x4")),
                       ("review_kd", build("review_kd"))):
    def init(student, teacher, method=method):
      return method.init(jax.random.PRNGKey(0), Batch(
          student=student, teacher=teacher, labels=jnp.zeros(2, jnp.int32),
          where=jnp.ones(2, bool), step=jnp.zeros((), jnp.int32)))
    params, _ = jax.eval_shape(init, student, teacher)
    counts[name] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  # OFD: 1x1 convs 64->64, 128->128, 256->256 plus BatchNorm scale/bias.
  # ReviewKD (mid 256): per stage conv1 C_s*256 + conv2 9*256*C_t + 2 BatchNorms, plus the
  # fusion 1x1 conv 512->2 (with bias) on the three shallower stages.
  assert counts == {"ofd": 86_912, "review_kd": 1_808_774}


# --- slow: end to end on the CIFAR ResNets ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ofd", "review_kd"])
def test_one_step_on_resnet32x4_to_resnet8x4(name):
  from kdjax import models
  student_module = models.get_model("resnet8x4", num_classes=100)
  teacher_module = models.get_model("resnet32x4", num_classes=100)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  student_variables = models.init_variables(student_module, jax.random.PRNGKey(1), x)
  teacher_variables = models.init_variables(teacher_module, jax.random.PRNGKey(2), x)
  teacher, _ = models.apply_fn(teacher_module)(teacher_variables, x, train=False)
  method = build(name, teacher_model="resnet32x4") if name == "ofd" else build(name)
  labels = jnp.arange(4, dtype=jnp.int32)

  def loss_fn(student_params, method_params, state):
    student, _ = models.apply_fn(student_module)(
        dict(student_variables, params=student_params), x, train=True)
    batch = Batch(student=student, teacher=teacher, labels=labels, where=jnp.ones(4, bool),
                  step=jnp.asarray(20000, jnp.int32), teacher_variables=teacher_variables)
    loss, metrics, _ = method.loss(method_params, state, batch, OPS)
    return loss, metrics

  student, _ = models.apply_fn(student_module)(student_variables, x, train=False)
  params, state = method.init(jax.random.PRNGKey(3), Batch(
      student=student, teacher=teacher, labels=labels, where=jnp.ones(4, bool),
      step=jnp.zeros((), jnp.int32)))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      student_variables["params"], params, state)
  assert np.isfinite(loss) and metrics[name] > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_initialisation():
  """The official schemes: OFD's connector conv N(0, 2 / (k*k*C_out)) and BatchNorm (1, 0);
  the ABF convs kaiming_uniform(a=1) (bound sqrt(3 / fan_in)), the attention conv PyTorch's
  default (bound 1 / sqrt(fan_in) for weights and bias)."""
  batch = make_batch(13, [(2, 2, 64)], [(2, 2, 128)], teacher_variables=None)
  params, state = ofd_method(student_tap="s0", teacher_tap="t0", teacher_bn="x").init(
      jax.random.PRNGKey(0), batch)
  kernel = np.asarray(params["connector0"]["conv"]["kernel"])
  assert kernel.shape == (1, 1, 64, 128)
  np.testing.assert_allclose(kernel.std(), math.sqrt(2 / 128), rtol=0.05)
  assert np.abs(kernel).max() > 2.5 * math.sqrt(2 / 128)  # Not truncated at 2 std.
  np.testing.assert_array_equal(params["connector0"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(params["connector0"]["bn"]["bias"], 0.0)
  np.testing.assert_array_equal(state["batch_stats"]["connector0"]["bn"]["var"], 1.0)

  batch = make_batch(14, [(4, 4, 32), (64,)], [(4, 4, 16), (8,)])
  params, _ = review_method(student_tap="s0,s1", teacher_tap="t0,t1").init(
      jax.random.PRNGKey(0), batch)
  conv1 = np.asarray(params["abf0"]["conv1"]["kernel"])  # fan_in 32, mid = 64
  assert conv1.shape == (1, 1, 32, 64)
  bound = math.sqrt(3 / 32)
  assert np.abs(conv1).max() <= bound and np.abs(conv1).max() > 0.9 * bound
  conv2 = np.asarray(params["abf0"]["conv2"]["kernel"])  # fan_in 9 * 64
  assert conv2.shape == (3, 3, 64, 16) and np.abs(conv2).max() <= math.sqrt(3 / 576)
  attention = params["abf0"]["att_conv"]
  assert attention["kernel"].shape == (1, 1, 128, 2)
  assert np.abs(attention["kernel"]).max() <= 1 / math.sqrt(128)
  assert np.abs(attention["bias"]).max() <= 1 / math.sqrt(128)
  assert np.any(np.asarray(attention["bias"]) != 0)


@pytest.mark.slow
def test_against_pytorch_reimplementations_of_the_official_modules():
  """ReviewKD's ABF stack and OFD's connector in PyTorch (train-mode BatchNorm2d, nearest
  F.interpolate, NCHW), written from the official code, with kdjax's weights copied in."""
  import torch
  import torch.nn.functional as F

  from kdjax.methods.ofd import ConvBNConnector

  nchw = lambda x: torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
  oihw = lambda k: torch.tensor(np.asarray(k, np.float32)).permute(3, 2, 0, 1)

  def torch_bn(x, bn):
    module = torch.nn.BatchNorm2d(x.shape[1])
    module.weight.data, module.bias.data = (torch.tensor(np.asarray(bn["scale"])),
                                            torch.tensor(np.asarray(bn["bias"])))
    return module.train()(x), module

  # ReviewKD: three stages (a 1x1 embedding, a 2x2 and a 4x4 map).
  method = review_method(warmup_steps=0)
  batch = make_batch(15, REVIEW_STUDENT, REVIEW_TEACHER, b=6)
  params, state = fast_init(method, batch, 16)
  students, teachers = method._maps(batch)  # pylint: disable=protected-access
  fused, _ = method.fusion(students, teachers).apply(
      {"params": params, "batch_stats": state["batch_stats"]}, students,
      jnp.ones(6, bool), mutable=["batch_stats"])
  x = [nchw(s) for s in students][::-1]
  abfs = [params[f"abf{k}"] for k in range(3)][::-1]
  out_shapes = [t.shape[1] for t in teachers][::-1]
  results, residual = [], None
  with torch.no_grad():
    for i, (feature, p, out_shape) in enumerate(zip(x, abfs, out_shapes)):
      n, _, h, w = feature.shape
      y = torch_bn(F.conv2d(feature, oihw(p["conv1"]["kernel"])), p["bn1"])[0]
      if i > 0:
        r = F.interpolate(residual, (h, h), mode="nearest")
        z = torch.sigmoid(F.conv2d(torch.cat([y, r], 1), oihw(p["att_conv"]["kernel"]),
                                   torch.tensor(np.asarray(p["att_conv"]["bias"]))))
        y = y * z[:, 0].view(n, 1, h, w) + r * z[:, 1].view(n, 1, h, w)
      if y.shape[-1] != out_shape:
        y = F.interpolate(y, (out_shape, out_shape), mode="nearest")
      out = torch_bn(F.conv2d(y, oihw(p["conv2"]["kernel"]), padding=1), p["bn2"])[0]
      results.insert(0, out)
      residual = y
  for ours, theirs in zip(fused, results):
    np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-4, atol=1e-5)

  # OFD: the connector (1x1 conv, train-mode BatchNorm2d) and its running mean.
  method = ofd_method()
  batch = make_batch(17, OFD_STUDENT, OFD_TEACHER, b=6, teacher_variables=ofd_teacher_variables())
  params, state = fast_init(method, batch, 18)
  _, _, new_state = jit_loss(method, batch)(params, state)
  p = params["connector0"]
  with torch.no_grad():
    connected, module = torch_bn(F.conv2d(nchw(batch.student.features["s0"]),
                                          oihw(p["conv"]["kernel"])), p["bn"])
  student = batch.student.features["s0"]
  ours, _ = ConvBNConnector(5).apply(
      {"params": p, "batch_stats": state["batch_stats"]["connector0"]}, student,
      jnp.ones(6, bool), mutable=["batch_stats"])
  np.testing.assert_allclose(ours, connected.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_state["batch_stats"]["connector0"]["bn"]["mean"],
                             module.running_mean.numpy(), rtol=1e-4, atol=1e-6)

