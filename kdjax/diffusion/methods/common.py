"""What the diffusion methods share: per-example noise, the batch they write, the loss.

Every method's `rewrite_batch` (no gradient) replaces the batch's clean images by the
student's input, a dict `denoiser_model.model_inputs(x_σ, σ, labels)`, and writes the
regression target (`TARGET_KEY`, [b, H, W, C]) and its weight (`WEIGHT_KEY`, [b]) beside it;
the step runs the student once on that input with gradient, and `weighted_l2` is the loss.

Randomness is drawn per example from (the step's key, the example's `index`), so a batch
split over 1 or 8 devices draws the same numbers.
"""


import jax
import jax.numpy as jnp

from kdjax.diffusion import denoiser_model

TARGET_KEY = "diffusion_target"
WEIGHT_KEY = "diffusion_weight"


def per_example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
  """[b] keys, one per example, from the step's key and the examples' indices."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def per_example_normal(keys: jax.Array, shape) -> jax.Array:
  """[b, *shape] standard normal, row i from keys[i]."""
  return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def per_example_uniform_int(keys: jax.Array, low: int, high: int) -> jax.Array:
  """[b] ints in [low, high), row i from keys[i]."""
  return jax.vmap(lambda key: jax.random.randint(key, (), low, high))(keys)


def broadcast(values: jax.Array, like: jax.Array) -> jax.Array:
  """[b] -> [b, 1, 1, 1] (as many ones as `like` has axes after the batch)."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def mean_square(a: jax.Array, b: jax.Array) -> jax.Array:
  """[b]: mean over pixels of (a − b)²."""
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
  """[b]: sqrt(||a − b||² + c²) − c over each example's pixels (Song & Dhariwal 2023, eq. 10)."""
  squared = jnp.sum(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return jnp.sqrt(squared + c ** 2) - c


def student_image(batch) -> jax.Array:
  """The student's output image [b, H, W, C] of a method's `Batch`."""
  return denoiser_model.image(batch.student)


def target_and_weight(batch):
  """(target [b, H, W, C], weight [b]) written by `rewrite_batch`; when the loss is traced
  alone (the run's shape check, which does not rewrite), the student's own image and 1."""
  image = student_image(batch)
  return (batch.data.get(TARGET_KEY, jax.lax.stop_gradient(image)),
          batch.data.get(WEIGHT_KEY, jnp.ones(image.shape[:1], jnp.float32)))
