"""Vision Transformers: timm's parameter counts, the documented taps and their shapes, the
attention tap as softmax(q k^T / sqrt(d)), dropout only in training with an rng."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import registry, vit


def _abstract(module, size, batch=2):
  """(params, Output) as shapes only: no FLOPs, no compilation."""
  inputs = jnp.zeros((batch, size, size, 3))
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  output, _ = jax.eval_shape(lambda v: models.apply_fn(module)(v, inputs, train=False),
                             variables)
  return variables["params"], output


# timm: sum(p.numel() for p in timm.create_model(name).parameters()) (timm 1.0.x).
TIMM_COUNTS = {"vit_tiny_224": 5_717_416, "vit_small_224": 22_050_664}


@pytest.mark.parametrize("name", sorted(TIMM_COUNTS))
def test_224_parameter_counts_equal_timms(name):
  module = models.get_model(name, num_classes=1000)
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0),
                                                          jnp.zeros((1, 224, 224, 3))))
  assert models.count_params(variables["params"]) == TIMM_COUNTS[name]
  width = {"vit_tiny_224": 192, "vit_small_224": 384}[name]
  assert vit.parameter_count(image_size=224, patch_size=16, embed_dim=width, depth=12,
                             num_classes=1000) == TIMM_COUNTS[name]
  assert variables["params"]["pos_embed"].shape == (1, 197, width)  # 14 x 14 patches + class


def test_registry_entries_and_cifar_counts():
  assert {n: (registry.ENTRIES[n].input_kind, registry.ENTRIES[n].uses_batch_norm)
          for n in vit.MODELS} == {"vit_tiny": ("image32", False), "vit_small": ("image32", False),
                                   "vit_tiny_224": ("image224", False),
                                   "vit_small_224": ("image224", False)}
  # The formula, checked above against timm, for the 32x32 models with 100 classes
  # (timm's vit_tiny_patch16_224 with img_size=32, patch_size=4, num_classes=100: 5,380,132).
  assert vit.parameter_count(image_size=32, patch_size=4, embed_dim=192, depth=12,
                             num_classes=100) == 5_380_132
  assert vit.parameter_count(image_size=32, patch_size=4, embed_dim=384, depth=12,
                             num_classes=100) == 21_376_996


def test_taps_have_the_documented_names_and_shapes():
  params, output = _abstract(models.get_model("vit_small", num_classes=100), 32)
  assert models.count_params(params) == 21_376_996
  depth, tokens, heads, head_dim, width = 12, 65, 6, 64, 384
  expected = {"embedding": (2, width)}
  for i in range(1, depth + 1):
    expected[f"block{i}"] = (2, tokens, width)
    expected[f"attention{i}"] = (2, heads, tokens, tokens)
    for kind in ("query", "key", "value"):
      expected[f"{kind}{i}"] = (2, heads, tokens, head_dim)
  assert {k: tuple(v.shape) for k, v in output.features.items()} == expected
  assert output.logits.shape == (2, 100) and output.logits.dtype == jnp.float32


def random_variables(module, inputs, seed=0):
  """Variables of the module's shapes drawn with numpy: compiling the module's own init (a
  threefry stream per parameter) takes seconds on CPU. LayerNorm scales are near 1."""
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.normal(size=shape.shape).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.05 * noise)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def small_vit():
  """A 1-block vit_tiny (width 192, 3 heads) with dropout, its variables, 2 images and its
  jitted eval-mode forward (jitted once: eager ViT calls compile op by op)."""
  module = models.get_model("vit_tiny", num_classes=10, depth=1, dropout_rate=0.1,
                            attention_dropout_rate=0.1)
  inputs = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = random_variables(module, inputs)
  evaluate = jax.jit(lambda v, x: models.apply_fn(module)(v, x, train=False)[0])
  return module, variables, inputs, evaluate


def test_attention_tap_is_the_softmax_of_query_and_key_and_embedding_feeds_the_head(small_vit):
  module, variables, inputs, evaluate = small_vit
  output = evaluate(variables, inputs)
  f = {k: np.asarray(v, np.float64) for k, v in output.features.items()}
  scores = np.einsum("bhqd,bhkd->bhqk", f["query1"], f["key1"]) / np.sqrt(64)
  scores -= scores.max(-1, keepdims=True)
  expected = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  np.testing.assert_allclose(f["attention1"], expected, rtol=1e-4, atol=1e-6)
  # Tokens differ (the class token differs from the patches): attention is not uniform.
  assert np.abs(f["attention1"] - 1 / 65).max() > 1e-3
  # The class token after the final LayerNorm (eps 1e-6), then the head.
  cls = f["block1"][:, 0]
  norm = variables["params"]["norm"]
  normed = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-6)
  normed = normed * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  np.testing.assert_allclose(f["embedding"], normed, rtol=1e-4, atol=1e-5)
  head = variables["params"]["head"]
  np.testing.assert_allclose(output.logits, normed @ np.asarray(head["kernel"])
                             + np.asarray(head["bias"]), rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training_with_an_rng(small_vit):
  module, variables, inputs, evaluate = small_vit
  train = jax.jit(lambda v, x, rng: models.apply_fn(module)(v, x, train=True, rng=rng)[0].logits)
  eval_logits = evaluate(variables, inputs).logits
  a, b = train(variables, inputs, jax.random.key(2)), train(variables, inputs, jax.random.key(3))
  assert not np.allclose(a, eval_logits) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, train(variables, inputs, jax.random.key(2)))
  # No mutable collections: training returns no new model state.
  _, new_state = jax.eval_shape(lambda v: models.apply_fn(module)(
      v, inputs, train=True, rng=jax.random.key(2)), variables)
  assert new_state == {}


def test_wrong_input_size_names_the_expected_shape():
  module = models.get_model("vit_tiny", num_classes=10, depth=1)
  with pytest.raises(ValueError, match=r"VisionTransformer\(image_size=32, patch_size=4\): "
                                       r"inputs must be images \[B, 32, 32, C\] .* got shape "
                                       r"\(2, 224, 224, 3\)"):
    jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0),
                                                 jnp.zeros((2, 224, 224, 3))))


@pytest.mark.slow
def test_forward_matches_a_torch_reference_of_timms_vision_transformer():
  """PyTorch functional ops in float64, written from timm's `VisionTransformer.forward`
  (`Attention`, `Block`, `Mlp`; class-token pooling), on the same weights."""
  import torch
  import torch.nn.functional as F

  module = models.get_model("vit_tiny", num_classes=10, depth=2)
  inputs = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = random_variables(module, inputs, seed=4)
  output, _ = jax.jit(lambda v, x: models.apply_fn(module)(v, x, train=False))(variables, inputs)
  p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float64)), variables["params"])
  linear = lambda x, d: F.linear(x, d["kernel"].T, d["bias"])
  norm = lambda x, d: F.layer_norm(x, x.shape[-1:], d["scale"], d["bias"], eps=1e-6)

  x = torch.tensor(np.asarray(inputs, np.float64)).permute(0, 3, 1, 2)  # NCHW
  x = F.conv2d(x, p["patch_embed"]["kernel"].permute(3, 2, 0, 1), p["patch_embed"]["bias"],
               stride=4).flatten(2).transpose(1, 2)
  x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]
  batch, tokens, dim = x.shape
  attentions = []
  for i in (1, 2):
    block = p[f"block{i}"]
    qkv = linear(norm(x, block["norm1"]), block["attn"]["qkv"])
    q, k, v = qkv.reshape(batch, tokens, 3, 3, dim // 3).permute(2, 0, 3, 1, 4).unbind(0)
    attention = ((q * (dim // 3) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    attentions.append((q, attention))
    y = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + linear(y, block["attn"]["proj"])
    y = F.gelu(linear(norm(x, block["norm2"]), block["fc1"]))
    x = x + linear(y, block["fc2"])
  embedding = norm(x, p["norm"])[:, 0]
  logits = linear(embedding, p["head"])

  np.testing.assert_allclose(output.logits, logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(output.features["embedding"], embedding.numpy(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(output.features["block2"], x.numpy(), rtol=1e-4, atol=1e-5)
  for i, (q, attention) in enumerate(attentions, start=1):
    np.testing.assert_allclose(output.features[f"query{i}"], q.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(output.features[f"attention{i}"], attention.numpy(), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.slow  # Needs the [torch] extra, as the other PyTorch references.
@pytest.mark.parametrize("name", ["vit_tiny", "vit_small"])
def test_the_gpu_benchmarks_torch_vit_is_kdjaxs_network(name):
  """benchmarks/torch_vit.py (the PyTorch reference of the GPU benchmark's ViT step) has
  kdjax's parameter count at full depth, and on kdjax's weights computes kdjax's logits."""
  import torch
  from benchmarks import torch_vit

  full = torch_vit.build_vit(name, num_classes=100)
  assert sum(p.numel() for p in full.parameters()) == {"vit_tiny": 5_380_132,
                                                       "vit_small": 21_376_996}[name]
  module = models.get_model(name, num_classes=10, depth=2)
  inputs = np.random.default_rng(5).normal(size=(3, 32, 32, 3)).astype(np.float32)
  variables = random_variables(module, jnp.asarray(inputs), seed=6)
  output, _ = models.apply_fn(module)(variables, inputs, train=False)
  reference = torch_vit.build_vit(name, num_classes=10, depth=2)
  p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables["params"])
  state = {"patch_embed.weight": p["patch_embed"]["kernel"].permute(3, 2, 0, 1),
           "patch_embed.bias": p["patch_embed"]["bias"], "cls_token": p["cls_token"],
           "pos_embed": p["pos_embed"], "norm.weight": p["norm"]["scale"],
           "norm.bias": p["norm"]["bias"], "head.weight": p["head"]["kernel"].T,
           "head.bias": p["head"]["bias"]}
  for i in (1, 2):
    block = p[f"block{i}"]
    for ours, theirs in (("norm1", block["norm1"]), ("norm2", block["norm2"])):
      state[f"blocks.{i - 1}.{ours}.weight"] = theirs["scale"]
      state[f"blocks.{i - 1}.{ours}.bias"] = theirs["bias"]
    for ours, theirs in (("attn.qkv", block["attn"]["qkv"]), ("attn.proj", block["attn"]["proj"]),
                         ("fc1", block["fc1"]), ("fc2", block["fc2"])):
      state[f"blocks.{i - 1}.{ours}.weight"] = theirs["kernel"].T
      state[f"blocks.{i - 1}.{ours}.bias"] = theirs["bias"]
  reference.load_state_dict(state)  # strict: every parameter named once.
  with torch.no_grad():
    logits = reference(torch.tensor(inputs).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(output.logits, logits, rtol=1e-4, atol=1e-5)
