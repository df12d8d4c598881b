"""Token-level LM methods with `fused='on'` (hidden states, vocabulary-chunked) give the same
loss and student gradients as with `fused='off'` (full logits); `'auto'` picks by size."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.methods import base, lm_fused
from kdjax.methods.registry import get_method_class
from kdjax.models.pretrained import PretrainedConfig, build_module

VOCAB, LENGTH = 48, 6


def _config(hidden, layers, **overrides):
  fields = dict(model_type="llama", vocab_size=VOCAB, hidden_size=hidden,
                intermediate_size=2 * hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                head_dim=hidden // 2, max_position_embeddings=32, norm_eps=1e-6,
                activation="silu", tie_embeddings=False, layer_types=("full",) * layers)
  fields.update(overrides)
  return PretrainedConfig(**fields)


@pytest.fixture(scope="module")
def models():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)), jnp.int32)
  student = build_module(_config(16, 1))
  teacher = build_module(_config(24, 2, tie_embeddings=True))
  student_variables = student.init(jax.random.PRNGKey(1), tokens)
  teacher_variables = teacher.init(jax.random.PRNGKey(2), tokens)
  return student, student_variables, teacher.apply(teacher_variables, tokens), tokens


def _loss_and_grads(name, models, fused, **overrides):
  student, variables, teacher_output, tokens = models
  config = get_method_class(name).default_config()
  config.fused = fused
  for field, value in overrides.items():
    config[field] = value
  method = get_method_class(name)(config)
  labels = jnp.roll(tokens, -1, axis=1)
  where = jnp.asarray([[True] * LENGTH, [True] * 3 + [False] * 3])
  state = {"threshold": jnp.zeros(())} if name == "distillm" else {}

  def loss(params):
    output = student.apply({"params": params}, tokens)
    batch = base.Batch(student=output, teacher=teacher_output, labels=labels, where=where,
                       step=jnp.zeros((), jnp.int32))
    value, metrics, _ = method.loss({}, state, batch, base.single_device_ops())
    return value, metrics

  return jax.value_and_grad(loss, has_aux=True)(variables["params"])


@pytest.mark.parametrize("name,overrides", [
    ("kd", {}), ("kd", {"ce_weight": 0.0}), ("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}),
    ("skew_fkl", {}), ("skew_rkl", {}), ("tvd", {}), ("gkd", {"ce_weight": 0.5}),
    ("distillm", {})])
def test_fused_equals_unfused(models, name, overrides):
  (want, want_metrics), want_grads = _loss_and_grads(name, models, "off", **overrides)
  (got, got_metrics), got_grads = _loss_and_grads(name, models, "on", **overrides)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)
  assert float(jnp.abs(ravel_pytree(want_grads)[0]).max()) > 0
  for key in ("ce", "accuracy"):  # Fused, reported exactly when the CE is trained on.
    if key in got_metrics:
      np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5)


def test_chunked_cross_entropy_matches_full_logits():
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  unembedding = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, (3, 5)))
  where = jnp.asarray(rng.random((3, 5)) > 0.3)
  old = lm_fused.CE_BLOCK_ENTRIES
  lm_fused.CE_BLOCK_ENTRIES = 2 * 7  # Blocks of two tokens: several, the last padded.
  try:
    ce, correct = lm_fused.chunked_cross_entropy(hidden, unembedding, labels, where)
  finally:
    lm_fused.CE_BLOCK_ENTRIES = old
  logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce, np.where(where, want, 0), rtol=1e-5)
  np.testing.assert_array_equal(correct, np.where(where, logits.argmax(-1) == labels, 0))


def test_auto_and_on(models):
  student, variables, teacher_output, tokens = models
  output = student.apply(variables, tokens)
  batch = base.Batch(student=output, teacher=teacher_output, labels=tokens,
                     where=jnp.ones(tokens.shape, bool), step=jnp.zeros((), jnp.int32))
  assert not lm_fused.use_fused("auto", batch, "kd")  # 6 x 48 entries: below 2**24.
  assert lm_fused.use_fused("on", batch, "kd")
  no_unembedding = output._replace(features={"hidden": output.features["hidden"]})
  with pytest.raises(ValueError, match=r"config.kd.fused='on' needs features"):
    lm_fused.use_fused("on", base.Batch(student=no_unembedding, teacher=teacher_output,
                                        labels=tokens, where=batch.where, step=batch.step),
                       "kd")


@pytest.fixture(scope="module")
def transformer_lms():
  """kdjax's own byte-level TransformerLM as student (untied) and teacher (tied)."""
  from kdjax.models.transformer import TransformerLM  # pylint: disable=g-import-not-at-top
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, LENGTH)), jnp.int32)
  common = dict(vocab_size=VOCAB, num_heads=2, max_length=16)
  student = TransformerLM(num_layers=1, embed_dim=8, mlp_dim=16, tie_embeddings=False, **common)
  teacher = TransformerLM(num_layers=2, embed_dim=12, mlp_dim=24, **common)
  student_variables = student.init(jax.random.PRNGKey(5), tokens)
  teacher_variables = teacher.init(jax.random.PRNGKey(6), tokens)
  return student, student_variables, teacher.apply(teacher_variables, tokens), tokens


def test_transformer_lm_carries_its_unembedding(transformer_lms):
  from kdjax.models.transformer import unembedding_matrix  # pylint: disable=g-import-not-at-top
  student, variables, teacher_output, _ = transformer_lms
  output = student.apply(variables, transformer_lms[3])
  np.testing.assert_array_equal(output.features["unembedding"],
                                unembedding_matrix(variables["params"]))
  for out in (output, teacher_output):
    np.testing.assert_allclose(out.features["hidden"] @ out.features["unembedding"],
                               out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,overrides", [("kd", {}), ("jsd", {"beta": 0.3}),
                                            ("gkd", {"ce_weight": 0.5})])
def test_fused_equals_unfused_on_transformer_lm(transformer_lms, name, overrides):
  (want, _), want_grads = _loss_and_grads(name, transformer_lms, "off", **overrides)
  (got, _), got_grads = _loss_and_grads(name, transformer_lms, "on", **overrides)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)
  # The unembedding's gradient flows through the fused path too (untied student).
  assert float(jnp.abs(got_grads["unembed"]["kernel"]).max()) > 0
