"""A small CNN classifier of the 8x8 digits, whose embedding is the feature space of the sample
metrics (Fréchet distance, precision/recall; `metrics.py`) and whose predictions give class
coverage: FID's recipe with a domain classifier in place of Inception (not downloadable here).

Follows kdjax's model contract: `DigitsClassifier()(images) -> Output(logits, features)` with
features 'stage1', 'stage2' (conv maps) and 'embedding' ([B, embedding_dim], post-ReLU, the FD
features). Trained by `train_classifier` (Adam, a few seconds on one CPU core).
"""

from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.models.output import Output


class DigitsClassifier(nn.Module):
  """conv3x3(32)-ReLU, conv3x3(64, stride 2)-ReLU, dense(embedding_dim)-ReLU, dense(classes)."""
  num_classes: int = 10
  embedding_dim: int = 64

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False) -> Output:
    del train
    stage1 = nn.relu(nn.Conv(32, (3, 3), name="conv1")(inputs))
    stage2 = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="conv2")(stage1))
    embedding = nn.relu(nn.Dense(self.embedding_dim, name="dense")(
        stage2.reshape(stage2.shape[0], -1)))
    logits = nn.Dense(self.num_classes, name="head")(embedding)
    return Output(logits, {"stage1": stage1, "stage2": stage2, "embedding": embedding})


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 1500,
                     batch_size: int = 128, learning_rate: float = 1e-3,
                     weight_decay: float = 1e-4, seed: int = 0):
  """Trains a `DigitsClassifier` with AdamW on (images [N, 8, 8, 1], labels [N]).

  Each step draws a batch with replacement and shifts it by up to one pixel (random roll), so
  the embedding does not key on exact pixel positions of the training digits.
  Returns: (module, variables).
  """
  module = DigitsClassifier()
  rng = jax.random.PRNGKey(seed)
  variables = module.init(rng, jnp.zeros((1,) + images.shape[1:]))
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = optimizer.init(variables)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(variables, opt_state, rng):
    index_rng, shift_rng = jax.random.split(rng)
    index = jax.random.randint(index_rng, (batch_size,), 0, images.shape[0])
    shifts = jax.random.randint(shift_rng, (2,), -1, 2)
    batch = jnp.roll(images[index], shifts, axis=(1, 2))

    def loss_fn(variables):
      logits = module.apply(variables, batch).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  for rng_step in jax.random.split(jax.random.fold_in(rng, 1), steps):
    variables, opt_state, _ = step(variables, opt_state, rng_step)
  return module, variables


def embed(module: DigitsClassifier, variables, images, *, batch_size: int = 500
          ) -> Tuple[np.ndarray, np.ndarray]:
  """(embeddings [N, embedding_dim] float64, predicted labels [N]) of images [N, 8, 8, 1]."""
  apply = jax.jit(module.apply)
  features, predictions = [], []
  for start in range(0, len(images), batch_size):
    output = apply(variables, jnp.asarray(images[start:start + batch_size]))
    features.append(np.asarray(output.features["embedding"], np.float64))
    predictions.append(np.asarray(jnp.argmax(output.logits, axis=-1)))
  return np.concatenate(features), np.concatenate(predictions)


class Embedder(NamedTuple):
  """A trained classifier as a function: images [N, 8, 8, 1] -> (embeddings, predictions)."""
  module: DigitsClassifier
  variables: Any

  @classmethod
  def train(cls, data, **kwargs) -> "Embedder":
    """Trains on `data.train_images / train_labels` (a `digits.Digits`); kwargs: train_classifier's."""
    return cls(*train_classifier(data.train_images, data.train_labels, **kwargs))

  def __call__(self, images) -> Tuple[np.ndarray, np.ndarray]:
    return embed(self.module, self.variables, images)
