"""TransformerLM: registry entries and parameter counts, the documented taps, the forward against
a float64 numpy transcription, causality, RoPE, the KV cache against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import registry, transformer
from lm_table_models import random_lm_variables

VOCAB = 259


@pytest.fixture(scope="module")
def tiny():
  """(module, variables, jitted forward) of lm_tiny with random weights."""
  module = models.get_model("lm_tiny", num_classes=VOCAB)
  variables = random_lm_variables(module, 0)
  forward = jax.jit(lambda v, t: models.apply_fn(module)(v, t, train=False)[0])
  return module, variables, forward


def _tokens(seed, batch, length):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


# Counted from the shapes by hand: V D + L (4 D^2 + 3 D M + 2 D) + D.
EXPECTED_PARAMETERS = {"lm_tiny": 28_928, "lm_student": 591_360, "lm_teacher": 4_001_792}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_registry_entries_and_parameter_counts(name):
  entry = registry.ENTRIES[name]
  assert (entry.input_kind, entry.uses_batch_norm) == ("tokens", False)
  module = models.get_model(name, num_classes=VOCAB)
  assert module.vocab_size == VOCAB and module.max_length == 512
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0),
                                                          jnp.zeros((1, 4), jnp.int32)))
  count = models.count_params(variables["params"])
  assert count == EXPECTED_PARAMETERS[name]
  assert count == transformer.parameter_count(vocab_size=VOCAB, **transformer.SIZES[name])
  untied = models.get_model(name, num_classes=VOCAB, tie_embeddings=False)
  untied_variables = jax.eval_shape(lambda: models.init_variables(
      untied, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  assert (models.count_params(untied_variables["params"]) ==
          count + VOCAB * transformer.SIZES[name]["embed_dim"])


def test_taps_have_documented_shapes_and_dtypes():
  module = models.get_model("lm_tiny", num_classes=VOCAB, dtype=jnp.bfloat16)
  tokens = jnp.zeros((3, 5), jnp.int32)
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), tokens))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  output, state = jax.eval_shape(
      lambda v: models.apply_fn(module)(v, tokens, train=True), variables)
  assert state == {} and output.logits.shape == (3, 5, VOCAB)
  assert output.logits.dtype == jnp.float32
  shapes = {k: v.shape for k, v in output.features.items()}
  assert shapes == {"hidden": (3, 5, 32), "embedding": (3, 5, 32), "block1": (3, 5, 32),
                    "block2": (3, 5, 32), "attention1": (3, 2, 5, 5), "attention2": (3, 2, 5, 5),
                    "unembedding": (32, VOCAB)}
  assert output.features["attention1"].dtype == jnp.float32


def test_bad_inputs_fail_with_clear_messages(tiny):
  module, variables, _ = tiny
  with pytest.raises(ValueError, match=r"length 513 but max_length is 512"):
    module.apply(variables, jnp.zeros((1, 513), jnp.int32))
  with pytest.raises(ValueError, match=r"integer ids \[B, T\], got shape \(2, 4, 1\)"):
    module.apply(variables, jnp.zeros((2, 4, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"integer ids .* dtype float32"):
    module.apply(variables, jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"length 5 but the KV cache length is 4"):
    module.apply(variables, jnp.zeros((1, 5), jnp.int32), module.init_cache(1, 4),
                 method="decode")
  with pytest.raises(ValueError, match=r"max_length=600 must be in \[1, 512\]"):
    module.init_cache(1, 600)
  with pytest.raises(ValueError, match=r"embed_dim=30 must be num_heads=4 times an even"):
    models.init_variables(models.get_model("lm_tiny", num_classes=VOCAB, embed_dim=30,
                                           num_heads=4), jax.random.key(0),
                          jnp.zeros((1, 2), jnp.int32))


def _numpy_forward(params, tokens, num_heads, eps=1e-6, base=10000.0):
  """An independent float64 transcription of the LLaMA-style forward (tied unembedding)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  rms = lambda x, scale: x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale
  batch, length = tokens.shape
  x = p["embed"]["embedding"][np.asarray(tokens)]
  dim = x.shape[-1]
  head_dim = dim // num_heads
  # RoPE as complex rotation of (x_j, x_{j + d/2}) by position * base^(-2j/d).
  theta = np.arange(length)[:, None] * base ** (-np.arange(head_dim // 2) / (head_dim // 2))
  rotation = np.exp(1j * theta)

  def rope(v):  # [B, T, H, d]
    c = (v[..., :head_dim // 2] + 1j * v[..., head_dim // 2:]) * rotation[None, :, None, :]
    return np.concatenate([c.real, c.imag], -1)

  block_index = 0
  while f"blocks_{block_index}" in p:
    b = p[f"blocks_{block_index}"]
    h = rms(x, b["attention_norm"]["scale"])
    heads = lambda name: (h @ b["attention"][name]["kernel"]).reshape(
        batch, length, num_heads, head_dim)
    q, k, v = rope(heads("query")), rope(heads("key")), heads("value")
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
    x = x + attended @ b["attention"]["out"]["kernel"]
    h = rms(x, b["mlp_norm"]["scale"])
    gate = h @ b["gate"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ b["up"]["kernel"])) @ b["down"]["kernel"]
    block_index += 1
  hidden = rms(x, p["final_norm"]["scale"])
  return hidden @ p["embed"]["embedding"].T


def test_forward_matches_float64_numpy_reference(tiny):
  module, variables, forward = tiny
  tokens = _tokens(1, 2, 9)
  output = forward(variables, tokens)
  expected = _numpy_forward(variables["params"], tokens, module.num_heads)
  np.testing.assert_allclose(output.logits, expected, atol=2e-5, rtol=1e-4)
  assert np.std(expected) > 1e-3  # Not trivially zero logits.
  attention = np.asarray(output.features["attention2"])
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.triu(attention, k=1) == 0)


def test_unembedding_matrix_gives_the_logits(tiny):
  _, variables, forward = tiny
  output = forward(variables, _tokens(2, 2, 9))
  matrix = transformer.unembedding_matrix(variables["params"])
  assert matrix.shape == (32, VOCAB)
  np.testing.assert_allclose(output.features["hidden"] @ matrix, output.logits, atol=1e-5)


@pytest.mark.slow
def test_unembedding_matrix_gives_the_logits_untied():
  tokens = _tokens(2, 2, 6)
  untied = models.get_model("lm_tiny", num_classes=VOCAB, tie_embeddings=False)
  untied_variables, untied_output = jax.jit(lambda t: (
      lambda v: (v, untied.apply(v, t)))(models.init_variables(untied, jax.random.key(3), t)))(
          tokens)
  untied_matrix = transformer.unembedding_matrix(untied_variables["params"])
  np.testing.assert_array_equal(untied_matrix, untied_variables["params"]["unembed"]["kernel"])
  np.testing.assert_allclose(untied_output.features["hidden"] @ untied_matrix,
                             untied_output.logits, atol=1e-5)


def test_logits_are_causal(tiny):
  _, variables, forward = tiny
  tokens = _tokens(4, 2, 9)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % VOCAB)
  a, b = forward(variables, tokens).logits, forward(variables, changed).logits
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert not np.allclose(a[:, 5:], b[:, 5:])


def test_rope_matches_complex_rotation_and_is_relative():
  x = jax.random.normal(jax.random.key(0), (1, 2, 5, 8))
  positions = jnp.array([0, 1, 2, 7, 100])
  # <rope(q, m), rope(k, n)> depends on m - n only: (m, n) = (3, 1) and (12, 10).
  rotated, q, k = jax.jit(lambda x: (
      transformer.apply_rope(x, positions),
      transformer.apply_rope(jnp.broadcast_to(x[:, :1, :1], (1, 1, 2, 8)), jnp.array([3, 12])),
      transformer.apply_rope(jnp.broadcast_to(x[:, 1:, :1], (1, 1, 2, 8)), jnp.array([1, 10]))))(x)
  rotated = np.asarray(rotated, np.float64)
  xs = np.asarray(x, np.float64)
  theta = np.asarray(positions)[:, None] * 10000.0 ** (-np.arange(4) / 4)
  c = (xs[..., :4] + 1j * xs[..., 4:]) * np.exp(1j * theta)
  np.testing.assert_allclose(rotated, np.concatenate([c.real, c.imag], -1), atol=1e-4)
  dots = np.sum(np.asarray(q) * np.asarray(k), -1)[0, 0]
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward(tiny):
  module, variables, forward = tiny
  tokens = _tokens(5, 2, 9)
  full = forward(variables, tokens).logits
  decode = jax.jit(lambda v, t, c: module.apply(v, t, c, method="decode"))
  cache = module.init_cache(2, 12)
  logits, cache = decode(variables, tokens[:, :4], cache)  # Prefill a prompt of 4.
  pieces = [logits]
  for position in range(4, 9):  # Then one token per step.
    logits, cache = decode(variables, tokens[:, position:position + 1], cache)
    pieces.append(logits)
  assert int(cache.index) == 9
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
  # The cache holds exactly the written positions.
  assert np.all(np.asarray(cache.keys[0])[:, :, 9:] == 0)
  assert np.all(np.abs(np.asarray(cache.keys[1])[:, :, :9]).sum(-1) > 0)
