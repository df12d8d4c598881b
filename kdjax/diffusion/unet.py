"""A small U-Net denoiser for 8x8 digits (and 28x28 / 32x32 images), in flax linen.

The raw network F of `edm.denoise`: `UNet()(inputs [B, H, W, C], noise_labels [B], labels)
-> [B, H, W, C]`, conditioned on a scalar per example (EDM's c_noise = ln(σ)/4, or whatever
scalar a VP model is given) and optionally on a class label. The design is the DDPM / ADM
U-Net (Ho et al. 2020; Dhariwal & Nichol 2021) cut down:

  noise label -> Fourier features -> MLP -> embedding e   (+ a learned class embedding)
  conv in
  per level: `blocks_per_level` residual blocks (GroupNorm, SiLU, conv; e enters as a FiLM
             scale and shift after the second GroupNorm, ADM's "AdaGN"), then a stride-2 conv
  middle:    residual block, one self-attention (the lowest resolution only), residual block
  per level, back up: residual blocks on [h, skip] concatenated, nearest upsample + conv
  GroupNorm, SiLU, conv out (zero-initialised, so the untrained F is 0 and D = c_skip x)

Class conditioning: `num_classes` set adds an embedding table of num_classes + 1 rows; row
`num_classes` is the null label, used when `labels` is None (unconditional) and for the label
dropout of classifier-free guidance (Ho & Salimans 2022). `num_classes=None`: unconditional only.

Why a registry of its own (`DENOISERS`, `get_denoiser`) instead of `kdjax.models.registry`:
that registry's contract is a classifier, `apply(variables, inputs) -> Output(logits, features)`
checked against a dataset's input kind; a denoiser takes (x, noise label, class label) and
returns an image. Wiring denoisers into the main registry (e.g. an `input_kind` 'denoiser') is
left to the lead.
"""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import validation


def fourier_features(noise_labels: jax.Array, num_features: int, min_frequency: float = 0.25,
                     max_frequency: float = 32.0) -> jax.Array:
  """[cos(2π f_k c), sin(2π f_k c)] with f_k log-spaced in [min, max]: [B] -> [B, num_features].

  A deterministic Fourier embedding (EDM's NCSN++ draws its frequencies at random; fixed ones
  need no stored buffer). The defaults resolve c = ln(σ)/4 over σ ∈ [0.002, 80], c ∈ [−1.6, 1.1].
  """
  half = num_features // 2
  frequencies = jnp.exp(jnp.linspace(math.log(min_frequency), math.log(max_frequency), half))
  angles = 2.0 * jnp.pi * noise_labels.astype(jnp.float32)[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, GroupNorm, FiLM (1 + scale, shift) from the embedding, SiLU, dropout,
  conv (zero-initialised), plus the (1x1-projected) input."""
  channels: int
  num_groups: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, embedding, *, train: bool):
    h = nn.Conv(self.channels, (3, 3), name="conv1")(nn.silu(nn.GroupNorm(self.num_groups)(x)))
    scale, shift = jnp.split(nn.Dense(2 * self.channels, name="film")(embedding), 2, axis=-1)
    h = nn.GroupNorm(self.num_groups)(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv2")(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), name="skip")(x)
    return x + h


class SelfAttention(nn.Module):
  """Multi-head self-attention over the H·W positions, residual, output projection zero-init."""
  num_heads: int = 4
  num_groups: int = 8

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = nn.GroupNorm(self.num_groups)(x).reshape(batch, height * width, channels)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, out_kernel_init=nn.initializers.zeros, name="attention")(h, h)
    return x + h.reshape(x.shape)


class UNet(nn.Module):
  """The denoiser's raw network F (see the module docstring).

  Attributes:
    out_channels: image channels (1 for digits / MNIST, 3 for CIFAR).
    channels: width of the first level; level i has channels · channel_mults[i].
    channel_mults: one entry per resolution; each level after the first halves H and W
      (8x8 with (1, 2): 8 -> 4; 28x28 with (1, 2, 2): 28 -> 14 -> 7).
    blocks_per_level: residual blocks per level going down (one more going up, as in DDPM).
    num_classes: None for an unconditional model, else the number of classes (plus a null row).
    embedding_dim: width of the noise (and class) embedding; default 4 · channels.
    num_fourier_features: Fourier features of the noise label.
    num_heads: heads of the attention at the lowest resolution; 0 for none.
    num_groups: GroupNorm groups.
    dropout: dropout rate in the residual blocks (needs a 'dropout' rng when train=True).
  """
  out_channels: int = 1
  channels: int = 32
  channel_mults: Sequence[int] = (1, 2)
  blocks_per_level: int = 2
  num_classes: Optional[int] = None
  embedding_dim: Optional[int] = None
  num_fourier_features: int = 64
  num_heads: int = 4
  num_groups: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, inputs: jax.Array, noise_labels: jax.Array,
               labels: Optional[jax.Array] = None, *, train: bool = False) -> jax.Array:
    """inputs [B, H, W, C], noise_labels [B], labels int [B] (or None) -> [B, H, W, out_channels]."""
    batch = inputs.shape[0]
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
    embedding_dim = self.embedding_dim or 4 * self.channels
    embedding = fourier_features(noise_labels, self.num_fourier_features)
    embedding = nn.Dense(embedding_dim, name="noise_dense1")(embedding)
    embedding = nn.Dense(embedding_dim, name="noise_dense2")(nn.silu(embedding))
    if self.num_classes is not None:
      if labels is None:
        labels = jnp.full((batch,), self.num_classes, jnp.int32)  # the null label
      embedding = embedding + nn.Embed(self.num_classes + 1, embedding_dim,
                                       name="label_embedding")(labels)
    elif labels is not None:
      raise ValueError("UNet: labels given to an unconditional model (num_classes=None).")
    embedding = nn.silu(embedding)

    block = lambda channels, name: ResBlock(channels, self.num_groups, self.dropout, name=name)
    h = nn.Conv(self.channels * self.channel_mults[0], (3, 3), name="conv_in")(inputs)
    skips = [h]
    last = len(self.channel_mults) - 1
    for level, mult in enumerate(self.channel_mults):
      for i in range(self.blocks_per_level):
        h = block(self.channels * mult, f"down{level}_{i}")(h, embedding, train=train)
        skips.append(h)
      if level != last:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), name=f"downsample{level}")(h)
        skips.append(h)

    h = block(h.shape[-1], "middle1")(h, embedding, train=train)
    if self.num_heads:
      h = SelfAttention(self.num_heads, self.num_groups, name="middle_attention")(h)
    h = block(h.shape[-1], "middle2")(h, embedding, train=train)

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for i in range(self.blocks_per_level + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(self.channels * mult, f"up{level}_{i}")(h, embedding, train=train)
      if level != 0:
        skip_shape = skips[-1].shape
        h = jax.image.resize(h, (batch, skip_shape[1], skip_shape[2], h.shape[-1]), "nearest")
        h = nn.Conv(h.shape[-1], (3, 3), name=f"upsample{level}")(h)

    h = nn.silu(nn.GroupNorm(self.num_groups, name="norm_out")(h))
    return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                   name="conv_out")(h)


def unet_digits(**kwargs) -> UNet:
  """8x8 x 1: levels 8x8 (32 ch) and 4x4 (64 ch, attention there); 1.0M parameters."""
  return UNet(**{"out_channels": 1, "channels": 32, "channel_mults": (1, 2), **kwargs})


def unet_mnist(**kwargs) -> UNet:
  """28x28 x 1: levels 28, 14, 7 (32, 64, 64 ch)."""
  return UNet(**{"out_channels": 1, "channels": 32, "channel_mults": (1, 2, 2), **kwargs})


def unet_cifar(**kwargs) -> UNet:
  """32x32 x 3: levels 32, 16, 8 (64, 128, 128 ch)."""
  return UNet(**{"out_channels": 3, "channels": 64, "channel_mults": (1, 2, 2), **kwargs})


DENOISERS = {"unet_digits": unet_digits, "unet_mnist": unet_mnist, "unet_cifar": unet_cifar}


def get_denoiser(name: str, **kwargs) -> UNet:
  """The denoiser network `name` (a key of DENOISERS), with its fields overridden by kwargs."""
  validation.one_of("denoiser", name, DENOISERS)
  return DENOISERS[name](**kwargs)
