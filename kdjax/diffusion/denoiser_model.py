"""The digits U-Net as a kdjax model: `apply(variables, inputs) -> Output`, so that the train
step, the teachers and checkpoints handle a denoiser like any classifier.

Inputs. A dict pytree (what the diffusion methods' `rewrite_batch` writes into the batch):

    {'x': [B, H, W, C] noisy image x + σ n (EDM variables), 'sigma': [B] float, 'labels': [B] int}

or a bare image array [B, H, W, C] (the data pipeline's `inputs`: `init`, and the trunk's
eval step on the held-out images), read as a (nearly) clean image at σ = σ_min with the null
label: the network is then close to the identity and its logits close to the image.

Output. `Output(logits, features)` with `logits` the denoised image flattened, [B, H·W·C]
(flat so that the trunk's classification metrics, which always run, still have a class axis:
their values on a denoiser mean nothing, and the diffusion metrics are reported beside them),
`features['image']` the denoised image [B, H, W, C] and `features['embedding']` the logits.

Parameterisation, chosen per example by the input's 'consistency' flag [B] (so that one
registered student serves every method of a suite):
  0  EDM: D(x, σ) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, eq. 7). With
     σ_d = 1 this is exactly v-prediction (c_skip = α_t², c_out = −σ_t in VP variables;
     Salimans & Ho 2022, App. D), so a progressive student in this parameterisation is the
     paper's v-parameterised student up to σ_d = 0.85.
  1  consistency: f(x, σ) = c_skip^CM x + c_out^CM F(...) with f(x, σ_min) = x exactly (Song et
     al. 2023, App. C; `edm.consistency_c_skip / _c_out`).
Both share F, so a consistency student starts from the EDM teacher's weights (as in Song et
al. 2023, whose CD students are initialised from the EDM teacher).

Models (`MODELS`, registered by `kdjax.models.registry`): `digits_unet` (random init) and
`digits_unet_from_teacher`, whose `init` returns the shipped teacher's weights (`kdjax/assets/digits_teacher.msgpack`): every distillation student starts from its
teacher (progressive: Salimans & Ho 2022 Alg. 2; consistency: Song et al. 2023 Sec. 6; DMD's
generator: Yin et al. 2024 Sec. 4), which the trunk has no config field for.
"""

import functools
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.diffusion import digits, edm, unet
from kdjax.models.output import Output

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TEACHER_FILE = os.path.join(ASSETS, "digits_teacher.msgpack")
TEACHER_MODEL = "digits_unet"
INPUT_KIND = "image8"


def model_inputs(x, sigma, labels=None, *, consistency: bool = False) -> dict:
  """The dict inputs of a denoiser model: x [B, H, W, C], sigma [B] (or scalar), labels [B]
  (None: the null label), and the parameterisation flag (`consistency`: f(x, σ_min) = x)."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), x.shape[:1])
  if labels is None:
    labels = jnp.full(x.shape[:1], digits.NUM_CLASSES, jnp.int32)  # the null label
  return {"x": x, "sigma": sigma, "labels": labels.astype(jnp.int32),
          "consistency": jnp.full(x.shape[:1], float(consistency), jnp.float32)}


def image(output: Output) -> jax.Array:
  """The denoised image [B, H, W, C] of a denoiser model's Output."""
  return output.features["image"]


class DigitsDenoiser(nn.Module):
  """`unet.unet_digits` with EDM's (or the consistency) preconditioning; see the module doc."""
  sigma_data: float = digits.SIGMA_DATA
  sigma_min: float = 0.002
  num_classes: Optional[int] = digits.NUM_CLASSES
  channels: int = 32
  blocks_per_level: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, inputs, *, train: bool = False) -> Output:
    if not isinstance(inputs, dict):
      inputs = model_inputs(jnp.asarray(inputs, jnp.float32), self.sigma_min)
    x, sigma, labels = inputs["x"].astype(jnp.float32), inputs["sigma"], inputs["labels"]
    network = unet.unet_digits(channels=self.channels, num_classes=self.num_classes,
                               blocks_per_level=self.blocks_per_level, dropout=self.dropout,
                               name="unet")
    sigma_b = sigma.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    raw = network(edm.c_in(sigma_b, self.sigma_data) * x, edm.c_noise(sigma), labels,
                  train=train).astype(jnp.float32)
    boundary = inputs["consistency"].reshape(sigma_b.shape) > 0.5
    skip = jnp.where(boundary, edm.consistency_c_skip(sigma_b, sigma_min=self.sigma_min,
                                                      sigma_data=self.sigma_data),
                     edm.c_skip(sigma_b, self.sigma_data))
    out = jnp.where(boundary, edm.consistency_c_out(sigma_b, sigma_min=self.sigma_min,
                                                    sigma_data=self.sigma_data),
                    edm.c_out(sigma_b, self.sigma_data))
    denoised = skip * x + out * raw
    flat = denoised.reshape(denoised.shape[0], -1)
    return Output(flat, {"image": denoised, "embedding": flat})


@functools.lru_cache(maxsize=2)
def _teacher_variables(path: str):
  from kdjax.train.checkpoint import load_exported_variables  # pylint: disable=g-import-not-at-top
  module = DigitsDenoiser()
  expected = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + digits.IMAGE_SHAPE), train=False))
  return load_exported_variables(path, expected, model_name=TEACHER_MODEL)


def teacher_variables(path: str = TEACHER_FILE) -> dict:
  """The shipped digits teacher's variables ({'params': {'unet': ...}}), host float32 arrays."""
  return jax.tree.map(lambda x: x.copy(), _teacher_variables(path))


def _from_teacher(num_classes: int = digits.NUM_CLASSES, **kwargs):
  """The denoiser whose `init` returns the shipped teacher's weights (whatever the rng)."""
  from kdjax.models.adapters import ModelFns, from_linen  # pylint: disable=g-import-not-at-top
  del num_classes
  fns = from_linen(DigitsDenoiser(**kwargs))
  return ModelFns(init=lambda rng, sample: teacher_variables(), apply=fns.apply)


def _random_init(num_classes: int = digits.NUM_CLASSES, **kwargs):
  del num_classes  # The conditioning classes are the data's; `num_classes` is the config's.
  return DigitsDenoiser(**kwargs)


# name -> (factory, input_kind, uses_batch_norm), the `kdjax.models.registry` family table.
MODELS = {
    "digits_unet": (_random_init, INPUT_KIND, False),
    "digits_unet_from_teacher": (_from_teacher, INPUT_KIND, False),
}
