"""CRD: the NCE objective against a float64 reference of the official ContrastLoss, the
memory bank and Z as the official ContrastMemory, and identical banks on every replica."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from kdjax.methods import Batch, base
from kdjax.models.output import Output
from methods_helpers import PMAP_AXIS, build, simulated_pmap_ops

OPS = methods.single_device_ops()
NUM_DATA, K, FEAT = 50, 6, 4


def ref_contrast_loss(x, num_data, eps=1e-7):
  """RepDistiller crd/criterion.py ContrastLoss on x [bsz, K+1] (column 0 positive)."""
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / num_data
  p_pos = x[:, 0]
  log_d1 = np.log(p_pos / (p_pos + m * pn + eps))
  p_neg = x[:, 1:]
  log_d0 = np.log((m * pn) / (p_neg + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def test_crd_nce_matches_the_official_contrast_loss_in_float64():
  rng = np.random.default_rng(0)
  x = np.exp(rng.normal(size=(5, 8)))
  with jax.enable_x64(True):
    got = losses.crd_nce(jnp.asarray(x[:, 0]), jnp.asarray(x[:, 1:]), num_data=100)
    np.testing.assert_allclose(jnp.mean(got), ref_contrast_loss(x, 100), rtol=1e-12)
    where = np.array([True, False, True, True, False])
    bad = x.copy()
    bad[~where] = np.nan
    masked = losses.crd_nce(jnp.asarray(bad[:, 0]), jnp.asarray(bad[:, 1:]), num_data=100,
                            where=jnp.asarray(where))
    np.testing.assert_allclose(jnp.sum(masked) / where.sum(),
                               ref_contrast_loss(x[where], 100), rtol=1e-12)
    assert np.all(np.asarray(masked)[~where] == 0)
  with pytest.raises(ValueError, match=r"crd_nce: num_data must be an integer larger than the "
                                       r"number of negatives K=7"):
    losses.crd_nce(jnp.ones(5), jnp.ones((5, 7)), num_data=7)


def crd_batch(seed, b=8, step=0, masked=None):
  rng = np.random.default_rng(seed)
  where = np.ones(b, bool) if masked is None else ~np.asarray(masked)
  return Batch(
      student=Output(jnp.asarray(rng.normal(size=(b, 3)), jnp.float32),
                     {"embedding": jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)}),
      teacher=Output(jnp.asarray(rng.normal(size=(b, 3)), jnp.float32),
                     {"embedding": jnp.asarray(rng.normal(size=(b, 7)), jnp.float32)}),
      labels=jnp.asarray(rng.integers(0, 3, b), jnp.int32), where=jnp.asarray(where),
      step=jnp.asarray(step, jnp.int32), rng=jax.random.PRNGKey(seed),
      data={"index": jnp.asarray(rng.permutation(NUM_DATA)[:b], jnp.int32)})


def _method(**fields):
  cls = methods.get_method_class("crd")
  config = cls.default_config()
  config.update(dict(dict(nce_k=K, feat_dim=FEAT, negatives="uniform"), **fields))
  method = cls(config)
  method.prepare(base.RunFacts(num_train_examples=NUM_DATA))
  return method


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_memory_and_z_follow_the_official_contrast_memory():
  method = _method(ce_weight=0.0, feature_weight=1.0)
  batch = crd_batch(0)
  params, state = method.init(jax.random.PRNGKey(1), batch)
  assert state["memory_student"].shape == (NUM_DATA, FEAT)
  bound = 1 / np.sqrt(FEAT / 3)
  assert np.abs(state["memory_student"]).max() <= bound
  loss, metrics, new_state = method.loss(params, state, batch, OPS)

  # The same computation in numpy float64, from the official code's steps.
  dense = lambda p, x: np.asarray(x, np.float64) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  v_s = _normalize(dense(params["head_student"], batch.student.features["embedding"]))
  v_t = _normalize(dense(params["head_teacher"], batch.teacher.features["embedding"]))
  index = np.asarray(batch.data["index"])
  negatives = np.asarray(jax.random.randint(batch.rng, (8, K), 0, NUM_DATA))
  idx = np.concatenate([index[:, None], negatives], axis=1)  # Column 0: the positive.
  mem_s = np.asarray(state["memory_student"], np.float64)
  mem_t = np.asarray(state["memory_teacher"], np.float64)
  out_v1 = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], v_s) / 0.07)  # student vs teacher bank
  out_v2 = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], v_t) / 0.07)
  z_v1, z_v2 = out_v1.mean() * NUM_DATA, out_v2.mean() * NUM_DATA
  expected = (ref_contrast_loss(out_v1 / z_v1, NUM_DATA)
              + ref_contrast_loss(out_v2 / z_v2, NUM_DATA))
  np.testing.assert_allclose(metrics["crd"], expected, rtol=2e-4)
  np.testing.assert_allclose(loss, expected, rtol=2e-4)
  np.testing.assert_allclose(new_state["z_teacher"], z_v1, rtol=2e-4)
  np.testing.assert_allclose(new_state["z_student"], z_v2, rtol=2e-4)
  # Memory rows of the batch move to normalise(0.5 old + 0.5 new); the others stay.
  np.testing.assert_allclose(new_state["memory_student"][index],
                             _normalize(0.5 * mem_s[index] + 0.5 * v_s), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["memory_teacher"][index],
                             _normalize(0.5 * mem_t[index] + 0.5 * v_t), rtol=1e-5, atol=1e-6)
  others = np.setdiff1d(np.arange(NUM_DATA), index)
  np.testing.assert_array_equal(new_state["memory_student"][others], mem_s[others])
  # Z is fixed after the first step.
  _, _, third = method.loss(params, new_state, crd_batch(1, step=1), OPS)
  assert float(third["z_student"]) == float(new_state["z_student"])


@pytest.mark.parametrize("fields", [{}, {"negatives": "other_class"},
                                    {"memory": "queue", "queue_size": 20}])
def test_simulated_pmap_gives_the_same_loss_and_identical_banks_on_every_replica(fields):
  method = _method(**fields)
  method.train_labels = np.arange(NUM_DATA) % 3
  masked = np.zeros(8, bool)
  masked[[1, 6]] = True
  batch = crd_batch(2, masked=masked)
  params, state = method.init(jax.random.PRNGKey(0), batch)
  whole_loss, _, whole_state = method.loss(params, state, batch, OPS)
  shard = lambda tree: jax.tree.map(lambda x: jnp.reshape(x, (4, 2) + x.shape[1:]), tree)

  def replica(student, teacher, labels, where, index):
    b = Batch(student, teacher, labels, where, batch.step, rng=batch.rng, data={"index": index})
    loss, _, new_state = method.loss(params, state, b, simulated_pmap_ops())
    return loss, new_state

  losses_r, states_r = jax.jit(jax.vmap(replica, axis_name=PMAP_AXIS))(
      shard(batch.student), shard(batch.teacher), shard(batch.labels), shard(batch.where),
      shard(batch.data["index"]))
  np.testing.assert_allclose(losses_r, [whole_loss] * 4, rtol=1e-5)
  for key, value in whole_state.items():
    for r in range(4):
      np.testing.assert_allclose(states_r[key][r], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_bank_size_and_negatives_are_checked():
  with pytest.raises(ValueError, match=r"config.crd.nce_k=6 negatives need a training split "
                                       r"larger than that; this one has 5 examples"):
    small = _method()
    small.prepare(base.RunFacts(num_train_examples=5))
    small.init(jax.random.PRNGKey(0), crd_batch(0))
  with pytest.raises(ValueError, match=r"config.crd.nce_momentum must be a number in \[0.0, "
                                       r"1.0\)"):
    build("crd", nce_momentum=1.0)


def test_other_class_negatives_are_uniform_over_the_other_classes_only():
  method = _method(negatives="other_class", nce_k=40)
  train_labels = np.random.default_rng(0).integers(0, 3, NUM_DATA)
  method.train_labels = train_labels
  batch = crd_batch(3)
  labels = jnp.asarray(train_labels[np.asarray(batch.data["index"])], jnp.int32)
  batch = Batch(batch.student, batch.teacher, labels, batch.where, batch.step, rng=batch.rng,
                data=batch.data)
  params, state = method.init(jax.random.PRNGKey(0), batch)
  loss, _, _ = method.loss(params, state, batch, OPS)
  assert np.isfinite(loss)
  for label in range(3):  # 2000 examples of one class, 40 negatives each.
    rows = jnp.full((2000,), label, jnp.int32)
    negatives = np.asarray(method._negatives(state, jax.random.PRNGKey(label), rows, rows))
    assert not np.any(train_labels[negatives] == label)  # Never the example's own class.
    counts = np.bincount(negatives.ravel(), minlength=NUM_DATA)[train_labels != label]
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
  with pytest.raises(ValueError, match=r"negatives='other_class' needs the training labels"):
    _method(negatives="other_class").init(jax.random.PRNGKey(0), batch)


def test_queue_memory_has_a_fixed_size_and_contrasts_against_the_current_other_side():
  method = _method(memory="queue", queue_size=12, ce_weight=0.0, feature_weight=1.0)
  method.prepare(base.RunFacts(num_train_examples=10**9))  # The queue does not grow with it.
  batch = crd_batch(4)
  params, state = method.init(jax.random.PRNGKey(1), batch)
  assert state["queue_student"].shape == (12, FEAT) and "memory_student" not in state
  loss, metrics, new_state = method.loss(params, state, batch, OPS)
  dense = lambda p, x: np.asarray(x, np.float64) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  v_s = _normalize(dense(params["head_student"], batch.student.features["embedding"]))
  v_t = _normalize(dense(params["head_teacher"], batch.teacher.features["embedding"]))
  negatives = np.asarray(jax.random.randint(batch.rng, (8, K), 0, 12))
  q_s = np.asarray(state["queue_student"], np.float64)
  q_t = np.asarray(state["queue_teacher"], np.float64)
  out_v1 = np.exp(np.concatenate([np.sum(v_t * v_s, -1)[:, None],
                                  np.einsum("bkd,bd->bk", q_t[negatives], v_s)], 1) / 0.07)
  out_v2 = np.exp(np.concatenate([np.sum(v_s * v_t, -1)[:, None],
                                  np.einsum("bkd,bd->bk", q_s[negatives], v_t)], 1) / 0.07)
  expected = (ref_contrast_loss(out_v1 / (out_v1.mean() * 12), 12)
              + ref_contrast_loss(out_v2 / (out_v2.mean() * 12), 12))
  np.testing.assert_allclose(metrics["crd"], expected, rtol=2e-4)
  # The batch's 8 embeddings took slots 0..7; the position wrapped to 8; slots 8..11 kept.
  np.testing.assert_allclose(new_state["queue_student"][:8], v_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_state["queue_student"][8:], q_s[8:].astype(np.float32))
  assert int(new_state["queue_position"]) == 8
  _, _, third = method.loss(params, new_state, crd_batch(5, step=1), OPS)
  assert int(third["queue_position"]) == 4  # (8 + 8) mod 12: the oldest entries go first.
  with pytest.raises(ValueError, match=r"config.crd.nce_k=6 negatives are drawn from a queue "
                                       r"of config.crd.queue_size=6"):
    _method(memory="queue", queue_size=6)
  with pytest.raises(ValueError, match=r"config.crd.memory='ring' is not valid; valid values: "
                                       r"bank, queue"):
    _method(memory="ring")
