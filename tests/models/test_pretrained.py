"""kdjax.models.pretrained without torch: save/load round trips, checks, KV cache, chat template.

The comparisons against transformers' own forward pass are in test_pretrained_hf.py (slow).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models import get_model
from kdjax.models.pretrained import (build_module, from_hf, load_pretrained, render_chat,
                                     save_pretrained, transformer_lm_as_llama,
                                     unembedding_matrix)
from kdjax.models.pretrained import layers
from kdjax.validation import ConfigError

VOCAB = 48
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
# One config.json per family, each with what sets it apart switched on.
CONFIGS = {
    "llama": dict(_DECODER, model_type="llama", rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}),
    "qwen2": dict(_DECODER, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_DECODER, model_type="qwen3", head_dim=12),
    "gemma2": dict(_DECODER, model_type="gemma2", head_dim=8, sliding_window=3,
                   query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                 n_positions=32),
}


def _random_params(module, seed=0, scale_centre=None):
  """Random parameters of `module`'s shapes (no compilation): norm scales near 1 (near 0 for
  Gemma's `1 + w`), everything else, biases included, N(0, 0.1^2), so that none is a no-op."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  if scale_centre is None:
    scale_centre = 0.0 if module.config.model_type == "gemma2" else 1.0

  def draw(path, leaf):
    centre = scale_centre if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(centre + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _variables(config, seed=0):
  module = build_module(config)
  return module, _random_params(module, seed)


def _tokens(batch=2, length=9, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
  """(config, module, variables, saved directory) of one family."""
  config = from_hf(CONFIGS[request.param])
  module, variables = _variables(config)
  directory = str(tmp_path_factory.mktemp(request.param))
  save_pretrained(directory, variables, config)
  return config, module, variables, directory, jax.jit(module.apply)


def test_round_trip_gives_equal_logits(family):
  config, _, variables, directory, forward = family
  loaded = load_pretrained(directory)
  assert loaded.config == config
  tokens = _tokens()
  want = forward(variables, tokens)
  got = forward(loaded.variables, tokens)
  np.testing.assert_array_equal(got.logits, want.logits)
  assert got.logits.shape == (2, 9, VOCAB)
  taps = {"block1", "block2", "hidden", "embedding"}
  if config.final_logit_softcapping is None:  # The fused losses' input (none when capped).
    taps.add("unembedding")
    np.testing.assert_array_equal(got.features["unembedding"],
                                  unembedding_matrix(loaded.variables["params"]))
  assert set(got.features) == taps
  assert got.features["hidden"].shape == (2, 9, config.hidden_size)
  logits = got.features["hidden"] @ unembedding_matrix(loaded.variables["params"])
  np.testing.assert_allclose(layers.soft_cap(logits, config.final_logit_softcapping),
                             got.logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_equals_full_forward(family):
  config, module, variables, _, forward = family
  tokens = _tokens()
  full = forward(variables, tokens).logits
  cache = module.init_cache(2, 9)
  decode = jax.jit(lambda t, c: module.apply(variables, t, c, method="decode"))
  prefill, cache = decode(tokens[:, :5], cache)
  steps = [prefill]
  for t in range(5, 9):  # Past gemma2's window of 3: the cached sliding mask is exercised.
    logits, cache = decode(tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 9
  assert cache.keys[0].shape == (2, config.num_kv_heads, 9, config.head_dim)


def test_bfloat16_load_keeps_bfloat16(tmp_path):
  config = from_hf(CONFIGS["gemma2"])
  _, variables = _variables(config)
  directory = str(tmp_path)
  save_pretrained(directory, variables, config)
  loaded = load_pretrained(directory, dtype=jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves(loaded.variables)
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
  full = load_pretrained(directory)
  tokens = _tokens()
  got = jax.jit(loaded.apply_fn)(loaded.variables, tokens).logits
  want = jax.jit(full.apply_fn)(full.variables, tokens).logits
  assert got.dtype == jnp.float32
  error = np.abs(np.asarray(got) - np.asarray(want))
  assert error.mean() < 0.03 and error.max() < 0.2, (error.mean(), error.max())


def test_sharded_checkpoint_loads(tmp_path):
  from safetensors.numpy import load_file, save_file
  config = from_hf(CONFIGS["llama"])
  module, variables = _variables(config)
  save_pretrained(str(tmp_path / "single"), variables, config)
  tensors = load_file(str(tmp_path / "single" / "model.safetensors"))
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({name: tensors[name] for name in part}, str(shard_dir / shard),
              metadata={"format": "pt"})
    weight_map.update({name: shard for name in part})
  (shard_dir / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  (shard_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
  loaded = load_pretrained(str(shard_dir))
  tokens = _tokens()
  np.testing.assert_array_equal(jax.jit(loaded.apply_fn)(loaded.variables, tokens).logits,
                                jax.jit(module.apply)(variables, tokens).logits)


def _rewrite(directory, edit):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _one_line_error(directory, *fragments):
  with pytest.raises(ValueError) as error:
    load_pretrained(str(directory))
  message = str(error.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


@pytest.fixture
def llama_dir(tmp_path):
  config = from_hf(CONFIGS["llama"])
  _, variables = _variables(config)
  save_pretrained(str(tmp_path), variables, config)
  return tmp_path


def test_unknown_model_type_is_refused(llama_dir):
  config = json.loads((llama_dir / "config.json").read_text())
  (llama_dir / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
  with pytest.raises(ConfigError, match=r"model_type='mistral' is not supported; supported: "
                     r"llama, qwen2, qwen3, gemma2, gpt2"):
    load_pretrained(str(llama_dir))


def test_missing_tensor_is_refused(llama_dir):
  _rewrite(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _one_line_error(llama_dir, "'model.layers.1.mlp.up_proj.weight'", "(40, 32)")


def test_misshaped_tensor_is_refused(llama_dir):
  def edit(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  _rewrite(llama_dir, edit)
  _one_line_error(llama_dir, "'model.layers.0.self_attn.k_proj.weight'", "(32, 32)", "(16, 32)")


def test_unexpected_tensor_is_refused(llama_dir):
  def edit(tensors):
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
  _rewrite(llama_dir, edit)
  _one_line_error(llama_dir, "unexpected tensor 'model.layers.2.mlp.up_proj.weight'", "(40, 32)")


def test_tokenizer_larger_than_vocabulary_is_refused(llama_dir):
  tokenizers = pytest.importorskip("tokenizers")
  vocabulary = {f"t{i}": i for i in range(VOCAB + 5)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="t0"))
  tokenizer.save(str(llama_dir / "tokenizer.json"))
  _one_line_error(llama_dir, "tokenizer.json", f"{VOCAB + 5} tokens", f"vocab_size is {VOCAB}")


def test_transformer_lm_maps_exactly_onto_llama():
  module = get_model("lm_tiny", num_classes=VOCAB)
  variables = _random_params(module, scale_centre=1.0)
  llama_variables, config = transformer_lm_as_llama(module, variables)
  tokens = _tokens(length=16)
  want = jax.jit(module.apply)(variables, tokens).logits
  got = jax.jit(build_module(config).apply)(llama_variables, tokens).logits
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_llama3_rope_scaling_by_wavelength():
  # d = 8, theta = 100: inverse frequencies 100^(-j/4), wavelengths 6.3, 19.9, 62.8, 199;
  # original length 32, factors 1 and 4: wavelengths < 8 stay, > 32 are divided by the factor
  # 8, in between interpolated.
  config = from_hf(dict(CONFIGS["llama"], head_dim=8, rope_theta=100.0, rope_scaling=dict(
      CONFIGS["llama"]["rope_scaling"], original_max_position_embeddings=32)))
  inverse = 100.0 ** (-np.arange(4) / 4)
  wavelength = 2 * np.pi / inverse
  smooth = (32 / wavelength - 1) / 3
  want = np.where(wavelength < 8, inverse,
                  np.where(wavelength > 32, inverse / 8,
                           (1 - smooth) * inverse / 8 + smooth * inverse))
  np.testing.assert_allclose(layers.rope_frequencies(config), want, rtol=1e-6)
  assert (wavelength < 8).sum() == 1 and (wavelength > 32).sum() == 2


def test_render_chat_matches_hand_written_text():
  template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  got = render_chat(template, messages, add_generation_prompt=True, eos_token="</s>")
  assert got == "<|user|>Hi</s>\n<|assistant|>Yo</s>\n<|assistant|>"


def test_sharding_rules_split_the_families_megatron_style():
  from kdjax.train import sharding_rules
  config = from_hf(CONFIGS["qwen2"])  # q/k/v biases.
  shapes = jax.eval_shape(build_module(config).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  specs = sharding_rules.partition_specs(shapes, 2)["params"]
  spec = jax.sharding.PartitionSpec
  block = specs["blocks_0"]
  assert block["attention"]["query"]["kernel"] == spec(None, "model")
  assert block["attention"]["key"]["bias"] == spec("model")
  assert block["attention"]["out"]["kernel"] == spec("model", None)
  assert block["mlp"]["gate"]["kernel"] == spec(None, "model")
  assert block["mlp"]["down"]["kernel"] == spec("model", None)
  assert block["attention_norm"]["scale"] == spec()
  assert specs["embed"]["embedding"] == spec("model", None)
