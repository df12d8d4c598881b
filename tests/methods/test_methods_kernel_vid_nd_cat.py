"""Methods cc, nst, vid, nd, cat_kd: each loss is the documented combination of CE, KD and its
term (recomputed here in numpy from the method's own parameters); relational and stateful
terms see the global batch (simulated pmap equals one device); ND's class centres are running
class means; config and shape mistakes fail naming the field, both shapes and the fix."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import quickstart
from kdjax import losses, methods
from kdjax.losses import kernel, norm_direction

from kdjax.methods import Batch
from kdjax.models.output import Output
from kdjax.train import ConfigError
from kdjax.train.preflight import abstract_model, check_method_fits_models
from methods_helpers import PMAP_AXIS, build, np_cross_entropy, simulated_pmap_ops

vid_losses = importlib.import_module("kdjax.losses.variational")

NAMES = ["cc", "nst", "vid", "nd", "cat_kd"]
OPS = methods.single_device_ops()
NUM_CLASSES = 5


def make_batch(seed, b=8, masked=None, garbage=False, teacher_variables=True):
  """Logits [b, 5]; student taps 'stage1..3' [b, 4, 4, 3], teacher 'stage1' [b, 8, 8, 6]
  (pooled to 4x4 by NST and VID) and 'stage2..3' [b, 4, 4, 6]; 'embedding' [b, 7] / [b, 9];
  the teacher's classifier 'head' reads its 6 channels."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  s_features = {f"stage{i}": normal(b, 4, 4, 3) for i in (1, 2, 3)}
  t_features = {"stage1": normal(b, 8, 8, 6), "stage2": normal(b, 4, 4, 6),
                "stage3": normal(b, 4, 4, 6)}
  s_features["embedding"], t_features["embedding"] = normal(b, 7), normal(b, 9)
  s_logits, t_logits = normal(b, NUM_CLASSES) * 2, normal(b, NUM_CLASSES) * 2
  labels = rng.integers(0, NUM_CLASSES, size=b).astype(np.int32)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  if garbage and masked is not None:
    for tree in (s_features, t_features):
      for value in tree.values():
        value[~where] = np.nan
    s_logits[~where], labels[~where] = np.nan, -100
  variables = {"params": {"head": {"kernel": jnp.asarray(normal(6, NUM_CLASSES)),
                                   "bias": jnp.zeros(NUM_CLASSES)}}}
  as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return Batch(student=Output(jnp.asarray(s_logits), as_jnp(s_features)),
               teacher=Output(jnp.asarray(t_logits), as_jnp(t_features)),
               labels=jnp.asarray(labels), where=jnp.asarray(where),
               step=jnp.zeros((), jnp.int32),
               teacher_variables=variables if teacher_variables else None)


# The losses the expected terms are built from, compiled once (not op by op, eagerly).
CC_LOSS, NST_LOSS, VID_LOSS, ND_LOSS, KD_LOSS = (
    jax.jit(f) for f in (kernel.correlation_congruence, kernel.nst, vid_losses.vid,
                         norm_direction.nd, lambda s, t: losses.kd(s, t, temperature=2.0)))


def jit_init(method, batch):
  """`method.init` on `batch`, compiled (Flax's init op by op is slower)."""
  def init(student, teacher, labels, where, teacher_variables):
    return method.init(jax.random.PRNGKey(0), Batch(student, teacher, labels, where,
                                                    jnp.zeros((), jnp.int32),
                                                    teacher_variables=teacher_variables))
  return jax.jit(init)(batch.student, batch.teacher, batch.labels, batch.where,
                       batch.teacher_variables)


def jit_loss(method, ops=OPS):
  """`method.loss` compiled once (a Batch is not a pytree: its fields are passed)."""
  def loss(params, state, student, teacher, labels, where, teacher_variables):
    batch = Batch(student, teacher, labels, where, jnp.zeros((), jnp.int32),
                  teacher_variables=teacher_variables)
    return method.loss(params, state, batch, ops)
  compiled = jax.jit(loss)
  return lambda params, state, b: compiled(params, state, b.student, b.teacher, b.labels,
                                           b.where, b.teacher_variables)


def block_mean(x, size):
  """[b, H, W, C] -> [b, size, size, C] by averaging equal blocks (numpy, float64)."""
  b, h, w, c = x.shape
  return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def np_params(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def expected_term(name, params, batch):
  """The term recomputed from the method's parameters, in numpy where the method adds
  anything to the losses (heads, regressors, pooling, CAMs, centres)."""
  s = {k: np.asarray(v, np.float64) for k, v in batch.student.features.items()}
  t = {k: np.asarray(v, np.float64) for k, v in batch.teacher.features.items()}
  p = np_params(params)
  dense = lambda x, layer: x @ layer["kernel"] + layer.get("bias", 0.0)
  if name == "cc":
    return CC_LOSS(dense(s["embedding"], p["head_student0"]),
                   dense(t["embedding"], p["head_teacher0"]))
  stages = [(s[k], t[k] if t[k].shape[1] == 4 else block_mean(t[k], 4))
            for k in ("stage1", "stage2", "stage3")]
  if name == "nst":
    return sum(np.mean(NST_LOSS(a, b)) for a, b in stages)
  if name == "vid":
    relu = lambda x: np.maximum(x, 0)
    total = 0.0
    for i, (a, b) in enumerate(stages):
      r = p[f"regressor{i}"]
      mean = relu(relu(a @ r["conv1"]["kernel"]) @ r["conv2"]["kernel"]) @ r["conv3"]["kernel"]
      total += np.mean(VID_LOSS(mean, b, p[f"alpha{i}"]))
    return total
  if name == "nd":
    labels = np.asarray(batch.labels)
    centres = np.stack([t["embedding"][labels == k].mean(0) if np.any(labels == k)
                        else np.zeros(9) for k in range(NUM_CLASSES)])
    return np.mean(ND_LOSS(dense(s["embedding"], p["connector0"]), t["embedding"], centres,
                           labels))
  if name == "cat_kd":
    head = np.asarray(batch.teacher_variables["params"]["head"]["kernel"], np.float64)
    student_cams = block_mean(s["stage3"] @ p["cam_head"]["kernel"], 2)
    teacher_cams = block_mean(t["stage3"] @ head, 2)  # No bias, as the official conv_test.
    return np.mean((student_cams - teacher_cams) ** 2)
  raise KeyError(name)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_ce_plus_weighted_term_plus_optional_kd(name):
  batch = make_batch(0)
  method = build(name, ce_weight=0.7, kd_weight=0.3, temperature=2.0)
  params, state = jit_init(method, batch)
  step = jit_loss(method)
  loss, metrics, new_state = step(params, state, batch)
  term = expected_term(name, params, batch)
  kd = np.mean(KD_LOSS(batch.student.logits, batch.teacher.logits))
  ce = np_cross_entropy(batch.student.logits, batch.labels)
  weight = method.config.feature_weight
  np.testing.assert_allclose(metrics[name], term, rtol=2e-5)
  np.testing.assert_allclose(loss, 0.7 * ce + weight * term + 0.3 * kd, rtol=2e-5)
  assert set(metrics) == {"loss", "ce", "kd", "accuracy", name}
  assert float(term) > 1e-4  # The term is not trivially zero on random features.
  if name == "nd":  # The centres are running class means: sums and counts over both steps.
    second = make_batch(3)
    _, _, new_state = step(params, new_state, second)
    embeddings = np.concatenate([batch.teacher.features["embedding"],
                                 second.teacher.features["embedding"]])
    labels = np.concatenate([batch.labels, second.labels])
    np.testing.assert_allclose(new_state["class_counts0"],
                               np.bincount(labels, minlength=NUM_CLASSES))
    np.testing.assert_allclose(
        new_state["class_sums0"],
        np.stack([embeddings[labels == k].sum(0) for k in range(NUM_CLASSES)]), rtol=1e-5,
        atol=1e-6)
  if name == "vid":  # alpha starts where softplus(alpha) + eps is RepDistiller's init_pred_var.
    np.testing.assert_allclose(jax.nn.softplus(params["alpha0"]) + 1e-5, np.full(6, 5.0),
                               rtol=1e-6)


def test_defaults_follow_the_cited_recipes():
  c = {name: methods.METHODS[name].default_config() for name in NAMES}
  assert {n: c[n].feature_weight for n in NAMES} == {"cc": 0.02, "nst": 50.0, "vid": 1.0,
                                                      "nd": 2.0, "cat_kd": 15.0}
  assert {n: c[n].kd_weight for n in NAMES} == {"cc": 0.0, "nst": 0.0, "vid": 0.0, "nd": 1.0,
                                                "cat_kd": 0.0}
  assert (c["cc"].gamma, c["cc"].order, c["cc"].embed_dim) == (0.4, 2, 128)
  assert (c["vid"].init_variance, c["vid"].eps) == (5.0, 1e-5)
  assert (c["cat_kd"].resolution, c["cat_kd"].normalize) == (2, False)
  assert c["nst"].student_tap == c["vid"].teacher_tap == "stage1,stage2,stage3"
  assert c["cat_kd"].student_tap == "stage3" and c["nd"].temperature == 4.0


@pytest.mark.parametrize("name", ["cc", "nd"])
def test_simulated_pmap_gives_the_single_device_loss_gradient_and_state(name):
  masked = np.zeros(16, bool)
  masked[[2, 7, 8, 13]] = True
  batch = make_batch(1, b=16, masked=masked, garbage=True, teacher_variables=False)
  method = build(name, kd_weight=0.0)
  params, state = jit_init(method, batch)

  def loss_of(student_features, b, ops):
    student = Output(b.student.logits, student_features)
    loss, _, new_state = method.loss(params, state,
                                     Batch(student, b.teacher, b.labels, b.where, b.step), ops)
    return loss, new_state

  (whole, whole_state), whole_grad = jax.jit(
      lambda f: jax.value_and_grad(loss_of, has_aux=True)(f, batch, OPS))(batch.student.features)
  shard = lambda tree: jax.tree.map(lambda x: jnp.reshape(x, (4, 4) + x.shape[1:]), tree)

  def replica(student, teacher, labels, where):
    b = Batch(student, teacher, labels, where, batch.step)
    return jax.value_and_grad(loss_of, has_aux=True)(student.features, b, simulated_pmap_ops())

  (replica_loss, replica_state), replica_grad = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      shard(batch.student), shard(batch.teacher), shard(batch.labels), shard(batch.where))
  np.testing.assert_allclose(replica_loss, jnp.full(4, whole), rtol=1e-5)
  if name == "nd":  # Padding rows (label -100, NaN embeddings) count in no class.
    np.testing.assert_array_equal(whole_state["class_counts0"], np.bincount(
        np.asarray(batch.labels)[~masked], minlength=NUM_CLASSES))
  for key, value in whole_state.items():  # Every replica holds the global batch's centres.
    np.testing.assert_allclose(replica_state[key], jnp.stack([value] * 4), rtol=1e-6)
  for key, value in whole_grad.items():
    np.testing.assert_allclose(jnp.reshape(replica_grad[key], value.shape) / 4, value,
                               rtol=1e-4, atol=1e-7, err_msg=key)
    assert np.all(np.isfinite(value)) and np.all(np.asarray(value)[masked] == 0)
  assert np.any(np.asarray(whole_grad["embedding"]) != 0)


def test_config_mistakes_name_the_field_and_what_is_allowed():
  with pytest.raises(ValueError, match=r"config.cc.order must be an integer >= 0"):
    build("cc", order=-1)
  with pytest.raises(ValueError, match=r"config.cc.gamma must be a positive number"):
    build("cc", gamma=0.0)
  with pytest.raises(ValueError, match=r"config.vid.init_variance must be a number larger than "
                                       r"config.vid.eps"):
    build("vid", init_variance=0.0)
  with pytest.raises(ValueError, match=r"config.cat_kd.normalize must be True or False"):
    config = methods.METHODS["cat_kd"].default_config().to_dict()
    methods.METHODS["cat_kd"](ml_collections.ConfigDict(dict(config, normalize="yes")))
  with pytest.raises(ValueError, match=r"config.cat_kd.resolution must be a positive integer"):
    build("cat_kd", resolution=0)
  with pytest.raises(ValueError, match=r"config.cat_kd.student_tap='stage2,stage3': CAT-KD "
                                       r"transfers .* one tap pair"):
    build("cat_kd", student_tap="stage2,stage3", teacher_tap="stage2,stage3")
  with pytest.raises(ValueError, match=r"config.nd.feature_weight must be a number >= 0"):
    build("nd", feature_weight=-1.0)


def test_mismatched_taps_name_both_shapes_and_the_fix():
  batch = make_batch(4)
  init = lambda name, **fields: jit_init(build(name, **fields), batch)
  with pytest.raises(ValueError, match=r"config.nst.student_tap='embedding' has shape \(8, 7\) "
                                       r"and config.nst.teacher_tap='stage1' has shape "
                                       r"\(8, 8, 8, 6\): neuron selectivity transfer needs "
                                       r"feature maps"):
    init("nst", student_tap="embedding", teacher_tap="stage1")
  with pytest.raises(ValueError, match=r"config.vid.student_tap='embedding' has shape \(8, 7\) "
                                       r"and config.vid.teacher_tap='stage2' has shape "
                                       r"\(8, 4, 4, 6\): the regressor maps channels"):
    init("vid", student_tap="embedding", teacher_tap="stage2")
  with pytest.raises(ValueError, match=r"config.nd.student_tap='stage3' has shape \(8, 4, 4, 3\) "
                                       r".*ND needs embeddings \[B, D\].*connector"):
    init("nd", student_tap="stage3")
  with pytest.raises(ValueError, match=r"config.cat_kd.student_tap='embedding' has shape "
                                       r"\(8, 7\) and config.cat_kd.teacher_tap='stage3' has "
                                       r"shape \(8, 4, 4, 6\): CAT-KD needs the last feature "
                                       r"maps"):
    init("cat_kd", student_tap="embedding")
  with pytest.raises(ValueError, match=r"config.cat_kd.teacher_classifier='fc': the teacher has "
                                       r"no such dense layer; its top-level parameters: head"):
    init("cat_kd", teacher_classifier="fc")
  wrong_head = dataclasses.replace(
      batch, teacher_variables={"params": {"head": {"kernel": jnp.zeros((7, NUM_CLASSES))}}})
  with pytest.raises(ValueError, match=r"config.cat_kd.teacher_classifier='head' has a kernel of "
                                       r"shape \(7, 5\), but config.cat_kd.teacher_tap='stage3' "
                                       r"has 6 channels and the student 5 classes: it must be "
                                       r"\(6, 5\)"):
    jit_init(build("cat_kd"), wrong_head)
  method = build("cat_kd")
  no_variables = make_batch(4, teacher_variables=False)
  params, state = jit_init(method, no_variables)  # Shape checks alone (as before preflight).
  with pytest.raises(ValueError, match=r"cat_kd builds the teacher's class activation maps .* "
                                       r"needs the teacher's variables"):
    jit_loss(method)(params, state, no_variables)


def _config(method, student="resnet8x4", teacher="resnet32x4", **fields):
  config = quickstart.get_config()
  config.dataset, config.num_classes, config.method = "cifar100", 100, method
  config.student.model, config.teacher.model = student, teacher
  config[method].update(fields)
  return config


def test_cifar_pair_traces_with_the_default_taps_and_parameter_counts():
  """jax.eval_shape only: resnet8x4 <- resnet32x4 (stage channels 64, 128, 256 on both)."""
  for name in NAMES:
    check_method_fits_models(_config(name))
  _, student = abstract_model("resnet8x4", 100, (32, 32, 3))
  teacher_variables, teacher = abstract_model("resnet32x4", 100, (32, 32, 3))
  counts = {}
  for name in NAMES:
    def init(student, teacher, teacher_variables, method=build(name)):
      sample = Batch(student, teacher, jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool),
                     jnp.zeros((), jnp.int32), teacher_variables=teacher_variables)
      return method.init(jax.random.PRNGKey(0), sample)
    params, state = jax.eval_shape(init, student, teacher, teacher_variables)
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    counts[name] = (size(params), size(state))
  assert counts == {
      "cc": (2 * (256 * 128 + 128), 0),  # Two linear heads to 128.
      "nst": (0, 0),
      "vid": (3 * (64**2 + 128**2 + 256**2) + (64 + 128 + 256), 0),  # 1x1 convs and alpha.
      "nd": (0, 100 * 256 + 100),  # Equal widths: no connector; class sums and counts.
      "cat_kd": (256 * 100, 0),  # The student's bias-free CAM conv.
  }
  with pytest.raises(ConfigError, match=r"config.nst.student_tap='embedding' has shape "
                                        r"\(2, 256\)"):
    check_method_fits_models(_config("nst", student_tap="embedding", teacher_tap="stage3"))
