"""Vision Transformers (Dosovitskiy et al. 2021) as timm defines them, with attention taps.

timm's `VisionTransformer` with its defaults: a patch embedding (a `patch x patch` conv with
stride `patch`), a class token, a learned position embedding over class token + patches,
`depth` pre-norm blocks `x + attn(norm1(x))`, `x + mlp(norm2(x))` (qkv projection with bias,
a GELU MLP of width `4 * dim`, LayerNorm eps 1e-6), a final LayerNorm and a linear head on the
class token.

| name            | input kind | patch | tokens T | dim | blocks | heads | parameters      |
| --------------- | ---------- | ----- | -------- | --- | ------ | ----- | --------------- |
| `vit_tiny`      | image32    | 4     | 65       | 192 | 12     | 3     | 5,380,132 (100) |
| `vit_small`     | image32    | 4     | 65       | 384 | 12     | 6     | 21,376,996 (100)|
| `vit_tiny_224`  | image224   | 16    | 197      | 192 | 12     | 3     | 5,717,416 (1000)|
| `vit_small_224` | image224   | 16    | 197      | 384 | 12     | 6     | 22,050,664 (1000)|

(classes in brackets; the factories' default `num_classes`.)
The 224 models' counts equal timm's `vit_tiny_patch16_224` / `vit_small_patch16_224`
(`sum(p.numel() for p in model.parameters())`), the 32 models' timm's with `img_size=32,
patch_size=4, num_classes=100`; the forward matches timm's on the same weights (a slow test
against a PyTorch transcription of timm's forward). With `D` the width, `L` the depth, `P` the
patch, `N` the patches and `C` the classes the count is
`(3 P^2 D + D) + D + (N + 1) D + L (12 D^2 + 13 D) + 2 D + (D C + C)`.
The factories take the module's fields as keyword arguments (`depth=2` for a small test model,
`dropout_rate`, `attention_dropout_rate`, `dtype`). Dropout (timm's `proj_drop` / `pos_drop`
and `attn_drop`; off by default, as in timm) draws from the apply function's `rng` in training.

Inputs `[B, S, S, 3]` (S = 32 or 224). Feature taps, with `i = 1..depth`, `T = N + 1` tokens
(class token first), `h` heads of width `d = D / h`:
  'block{i}'     [B, T, D]     the residual stream after block i ('block{depth}' is before
                               the final LayerNorm);
  'attention{i}' [B, h, T, T]  block i's attention probabilities softmax(q k^T / sqrt(d))
                               (float32, before attention dropout; rows sum to 1 over keys);
  'query{i}', 'key{i}', 'value{i}'  [B, h, T, d]  block i's projections, split into heads,
                               q unscaled (MiniLM's relations are computed from these);
  'embedding'    [B, D]        the class token after the final LayerNorm (the head's input).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.output import Output

# timm's `init_weights_vit_timm`: trunc_normal(std=.02) Linear weights, zero biases; the
# patch-embedding conv keeps PyTorch's default (kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))).
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_patch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_LAYER_NORM_EPS = 1e-6  # timm: partial(nn.LayerNorm, eps=1e-6)


class SelfAttention(nn.Module):
  """Multi-head self-attention; returns (output [B, T, D], taps of q, k, v, attention)."""
  num_heads: int
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, kernel_init=_dense_init, dtype=self.dtype, name="qkv")(x)
    # timm's layout: [B, T, 3 * D] -> [3, B, heads, T, head_dim] (q, k, v; heads contiguous).
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    # Scores and softmax in float32 whatever the compute dtype: the attention tap is a
    # distribution that distillation losses compare (bf16 rows would not sum to 1).
    scores = jnp.einsum("bhqd,bhkd->bhqk", query.astype(jnp.float32),
                        key.astype(jnp.float32)) / math.sqrt(head_dim)
    attention = jax.nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(self.attention_dropout_rate, deterministic=not train)(attention)
    out = jnp.einsum("bhqk,bhkd->bqhd", dropped.astype(value.dtype), value)
    out = nn.Dense(dim, kernel_init=_dense_init, dtype=self.dtype, name="proj")(
        out.reshape(batch, tokens, dim))
    out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    return out, {"query": query, "key": key, "value": value, "attention": attention}


class Block(nn.Module):
  """A pre-norm transformer block; returns (x [B, T, D], attention taps)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name=name)
    attended, taps = SelfAttention(self.num_heads, self.attention_dropout_rate,
                                   self.dropout_rate, self.dtype, name="attn")(
                                       norm("norm1")(x), train=train)
    x = x + attended
    y = nn.Dense(int(dim * self.mlp_ratio), kernel_init=_dense_init, dtype=self.dtype,
                 name="fc1")(norm("norm2")(x))
    y = nn.gelu(y, approximate=False)  # torch.nn.GELU's default: the exact erf form.
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(dim, kernel_init=_dense_init, dtype=self.dtype, name="fc2")(y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + y, taps


class VisionTransformer(nn.Module):
  """timm's ViT with a class-token head; see the module docstring for the taps."""
  image_size: int = 32
  patch_size: int = 4
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  num_classes: int = 100
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    expected = (self.image_size, self.image_size)
    if inputs.ndim != 4 or tuple(inputs.shape[1:3]) != expected:
      raise ValueError(
          f"VisionTransformer(image_size={self.image_size}, patch_size={self.patch_size}): "
          f"inputs must be images [B, {self.image_size}, {self.image_size}, C] (the position "
          f"embedding is learned for that size), got shape {tuple(inputs.shape)}.")
    if self.image_size % self.patch_size or self.embed_dim % self.num_heads:
      raise ValueError(
          f"VisionTransformer: image_size={self.image_size} must be a multiple of "
          f"patch_size={self.patch_size} and embed_dim={self.embed_dim} a multiple of "
          f"num_heads={self.num_heads}.")
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.embed_dim, patch, strides=patch, padding="VALID", kernel_init=_patch_init,
                dtype=self.dtype, name="patch_embed")(inputs)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.embed_dim)
    cls_token = self.param("cls_token", nn.initializers.normal(stddev=1e-6),
                           (1, 1, self.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.embed_dim)).astype(x.dtype),
                         x], axis=1)
    pos_embed = self.param("pos_embed", _dense_init, (1, x.shape[1], self.embed_dim))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos_embed.astype(x.dtype))
    features = {}
    for i in range(1, self.depth + 1):
      x, taps = Block(self.num_heads, self.mlp_ratio, self.dropout_rate,
                      self.attention_dropout_rate, self.dtype, name=f"block{i}")(x, train=train)
      features[f"block{i}"] = x
      features.update({f"{tap}{i}": value for tap, value in taps.items()})
    x = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
    embedding = x[:, 0]
    features["embedding"] = embedding
    logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype,
                      name="head")(embedding)
    return Output(logits.astype(jnp.float32), features)


def _factory(name, image_size, patch_size, embed_dim, num_heads, default_classes):
  def build(num_classes: int = default_classes, **kwargs) -> VisionTransformer:
    fields = dict(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=12,
                  num_heads=num_heads)
    fields.update(kwargs)
    return VisionTransformer(num_classes=num_classes, **fields)
  build.__name__ = build.__qualname__ = name
  build.__doc__ = (f"ViT {name}: {image_size}x{image_size} inputs, patch {patch_size}, dim "
                   f"{embed_dim}, 12 blocks, {num_heads} heads (timm definition); keyword "
                   "arguments override the VisionTransformer fields.")
  return build


vit_tiny = _factory("vit_tiny", 32, 4, 192, 3, 100)
vit_small = _factory("vit_small", 32, 4, 384, 6, 100)
vit_tiny_224 = _factory("vit_tiny_224", 224, 16, 192, 3, 1000)
vit_small_224 = _factory("vit_small_224", 224, 16, 384, 6, 1000)


def parameter_count(*, image_size: int, patch_size: int, embed_dim: int, depth: int,
                    num_classes: int, mlp_ratio: float = 4.0, channels: int = 3) -> int:
  """The parameter count of a VisionTransformer, from its shape (the docstring's formula)."""
  dim, hidden = embed_dim, int(embed_dim * mlp_ratio)
  tokens = (image_size // patch_size) ** 2 + 1
  patch_embed = channels * patch_size**2 * dim + dim
  block = (4 * dim  # two LayerNorms
           + dim * 3 * dim + 3 * dim  # qkv
           + dim * dim + dim  # proj
           + dim * hidden + hidden + hidden * dim + dim)  # MLP
  head = dim * num_classes + num_classes
  return patch_embed + dim + tokens * dim + depth * block + 2 * dim + head  # 2 * dim: final norm


# name -> (factory, input kind, uses BatchNorm); collected by `kdjax.models.registry`.
MODELS = {
    "vit_tiny": (vit_tiny, "image32", False),
    "vit_small": (vit_small, "image32", False),
    "vit_tiny_224": (vit_tiny_224, "image224", False),
    "vit_small_224": (vit_small_224, "image224", False),
}
