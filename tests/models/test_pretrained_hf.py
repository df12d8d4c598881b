"""kdjax.models.pretrained against transformers (slow; needs torch and transformers, `[hf]`).

For each family a tiny random transformers model (2 layers, hidden 64, vocabulary 300,
float32, every parameter perturbed so that norms and biases matter) is saved with
transformers' `save_pretrained` and loaded in kdjax: logits equal, greedy generation equal
token for token; kdjax's `save_pretrained` of changed parameters loads in transformers with
equal logits. The tokenizer's ids and the chat template's rendering equal transformers'.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.lm.generate import generate
from kdjax.models import apply_fn as kdjax_apply_fn
from kdjax.models import get_model
from kdjax.models.pretrained import (load_pretrained, render_chat, save_pretrained,
                                     transformer_lm_as_llama)

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=24),
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64),
}
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  return model


def _tokens(batch, length, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
  """(transformers model, kdjax Pretrained, forward, directory) of one family."""
  torch.manual_seed(0)
  model = _perturb(transformers.AutoModelForCausalLM.from_config(
      CONFIGS[request.param](), dtype=torch.float32).eval(), seed=1)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory)
  pretrained = load_pretrained(str(directory))
  return model, pretrained, jax.jit(pretrained.module.apply), directory


def test_logits_equal_transformers(family):
  model, pretrained, forward, _ = family
  tokens = _tokens(2, 12)
  got = forward(pretrained.variables, jnp.asarray(tokens)).logits
  np.testing.assert_allclose(got, _hf_logits(model, tokens), **TOLERANCE)


def _greedy_with_cache(module, variables, prompts, steps):
  """Greedy decoding with the family's KV cache: prefill, then one `lax.scan` step a token."""
  decode = lambda tokens, cache: module.apply(variables, tokens, cache, method="decode")

  @jax.jit
  def run(prompts):
    logits, cache = decode(prompts, module.init_cache(prompts.shape[0],
                                                      prompts.shape[1] + steps))
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
      cache, token = carry
      logits, cache = decode(token[:, None], cache)
      token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
      return (cache, token), token
    _, rest = jax.lax.scan(step, (cache, first), None, length=steps - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
  return np.asarray(run(prompts))


def test_greedy_generation_equals_transformers(family):
  model, pretrained, _, _ = family
  prompts = _tokens(2, 6, seed=1)
  with torch.no_grad():
    want = model.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape),
                          max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=0).numpy()[:, 6:]
  cached = _greedy_with_cache(pretrained.module, pretrained.variables,
                              jnp.asarray(prompts, jnp.int32), 8)
  np.testing.assert_array_equal(cached, want)
  # kdjax.lm.generate's path for any causal apply function (no cache) agrees too.
  uncached = generate(kdjax_apply_fn(pretrained.module), pretrained.variables,
                      jnp.asarray(prompts, jnp.int32), max_new_tokens=8, greedy=True)
  np.testing.assert_array_equal(np.asarray(uncached.tokens)[:, 6:], want)


def test_kdjax_save_loads_in_transformers(family, tmp_path):
  _, pretrained, forward, _ = family
  # A "trained student": every parameter moved away from the checkpoint.
  leaves, treedef = jax.tree_util.tree_flatten(pretrained.variables)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  variables = jax.tree_util.tree_unflatten(treedef, [
      leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])
  save_pretrained(str(tmp_path), variables, pretrained.config)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens = _tokens(2, 12, seed=2)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens),
                             forward(variables, jnp.asarray(tokens)).logits, **TOLERANCE)


def test_transformer_lm_saved_as_llama_equals_transformers(tmp_path):
  module = get_model("lm_tiny", num_classes=VOCAB)
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  save_pretrained(str(tmp_path), *transformer_lm_as_llama(module, variables))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(model).__name__ == "LlamaForCausalLM"
  tokens = _tokens(2, 40, seed=3)
  want = jax.jit(module.apply)(variables, jnp.asarray(tokens)).logits
  np.testing.assert_allclose(_hf_logits(model, tokens), want, **TOLERANCE)


CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
                 "{{ message['content'] | trim }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEXTS = ["The teacher distils its knowledge.", "Students learn: slowly, then all at once!",
         "  spaces   and\ttabs\n", "unseen wordsmithery 1234"]


def _tiny_tokenizer():
  """A byte-level BPE trained offline on a few sentences, with chat special tokens."""
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=290, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  corpus = ["Knowledge distillation trains a small student to match a large teacher.",
            "The student learns from the teacher's soft targets.",
            "Language models predict the next token."] * 20
  tokenizer.train_from_iterator(corpus, trainer)
  return tokenizer


def test_tokenizer_and_chat_template_equal_transformers(tmp_path):
  model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
  model.save_pretrained(tmp_path)
  tokenizer = _tiny_tokenizer()
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
      "chat_template": CHAT_TEMPLATE}))
  pretrained = load_pretrained(str(tmp_path))
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert pretrained.chat_template == CHAT_TEMPLATE
  for text in TEXTS:
    assert pretrained.tokenizer.encode(text).ids == reference(text)["input_ids"], text
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": " What is distillation? "},
              {"role": "assistant", "content": "Matching a teacher."},
              {"role": "user", "content": "Thanks"}]
  text = render_chat(pretrained.chat_template, messages, add_generation_prompt=True,
                     **pretrained.special_tokens)
  assert text == reference.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
  want_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(
      want_ids, "keys") else want_ids
  assert pretrained.tokenizer.encode(text, add_special_tokens=False).ids == list(want_ids)
  # The tokenizer written back by kdjax reads the same in transformers.
  save_pretrained(str(tmp_path / "out"), pretrained.variables, pretrained.config,
                  tokenizer=pretrained.tokenizer, chat_template=pretrained.chat_template,
                  special_tokens=pretrained.special_tokens)
  written = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert written(TEXTS[0])["input_ids"] == reference(TEXTS[0])["input_ids"]
  assert written.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
