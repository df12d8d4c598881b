"""Trains the digits diffusion teacher (EDM loss, EMA of params) and measures its samples.

    python -m kdjax.diffusion.train_teacher --out=/tmp/digits_teacher.msgpack \
        --results=/tmp/digits_teacher.json

A plain loop on purpose (the core's demonstration, not kdjax's trainer): one jitted step
(Adam, EDM's denoising loss on `unet_digits`, label dropout for an unconditional null label),
an EMA of the parameters (EDM's teacher is its EMA), then FD / precision / recall / class
coverage in a digits classifier's embedding (`classifier.py`) of samples from fixed noise at
several samplers and step counts, against the 300 held-out digits.
"""

import argparse
import dataclasses
import json
import time
from typing import Any, Dict, Optional, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.diffusion import classifier, digits, edm, metrics, samplers, unet


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Where each default comes from: EDM (Karras et al. 2022) Table 1 for the loss and σ
  distribution, σ_data measured on the digits (`digits.SIGMA_DATA`); Adam and the EMA as in
  EDM's CIFAR-10 setup, scaled down (their lr 1e-3, EMA half-life of 500k images; here 4,000
  steps of 64 see 192k images, 128 epochs of the 1,497 digits, ~12 minutes on a shared CPU core); label dropout 0.1 as classifier-free guidance (Ho & Salimans
  2022) uses, so the teacher also samples unconditionally."""
  denoiser: str = "unet_digits"
  channels: int = 32
  blocks_per_level: int = 2
  num_classes: int = 10
  label_dropout: float = 0.1
  dropout: float = 0.1
  steps: int = 3000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 200
  ema_decay: float = 0.999
  seed: int = 0
  sigma_data: float = digits.SIGMA_DATA

  def edm(self) -> edm.EDMConfig:
    return edm.EDMConfig(sigma_data=self.sigma_data)

  def module(self) -> unet.UNet:
    return unet.get_denoiser(self.denoiser, channels=self.channels, num_classes=self.num_classes,
                             blocks_per_level=self.blocks_per_level, dropout=self.dropout)


def ema_decay_at(step, decay: float):
  """min(decay, (1 + step) / (10 + step)): a short memory early, when the params move most."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(module: unet.UNet, config: TeacherConfig, optimizer, images, labels):
  """(params, ema, opt_state, step) -> (params, ema, opt_state, loss), jitted; the data is on
  device and batches are drawn in the step (with replacement) from a key folded by step."""
  edm_config = config.edm()

  @jax.jit
  def train_step(params, ema, opt_state, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
    index_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
    index = jax.random.randint(index_rng, (config.batch_size,), 0, images.shape[0])
    batch_labels = jnp.where(jax.random.bernoulli(drop_rng, config.label_dropout,
                                                  (config.batch_size,)),
                             config.num_classes, labels[index])

    def loss_fn(params):
      apply = lambda variables, x, noise, labels: module.apply(
          variables, x, noise, labels, train=True, rngs={"dropout": dropout_rng})
      return jnp.mean(edm.denoising_loss(apply, {"params": params}, images[index], loss_rng,
                                         batch_labels, config=edm_config))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    decay = ema_decay_at(step, config.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    return params, ema, opt_state, loss

  return train_step


def train_teacher(config: TeacherConfig, data: Optional[digits.Digits] = None,
                  log_every: int = 500) -> Dict[str, Any]:
  """Trains the teacher; returns {'module', 'params', 'ema_params', 'losses', 'seconds'}."""
  data = data or digits.load()
  module = config.module()
  images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
  params = module.init(jax.random.PRNGKey(config.seed), images[:1], jnp.zeros((1,)),
                       labels[:1])["params"]
  warmup = min(config.warmup_steps, config.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                config.steps, config.learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = optimizer.init(params)
  train_step = make_train_step(module, config, optimizer, images, labels)
  ema, losses, start = params, [], time.time()
  for step in range(config.steps):
    params, ema, opt_state, loss = train_step(params, ema, opt_state, step)
    losses.append(loss)
    if log_every and (step + 1) % log_every == 0:
      recent = float(np.mean(jax.device_get(losses[-log_every:])))
      print(f"step {step + 1}: loss {recent:.4f} ({time.time() - start:.0f}s)", flush=True)
  return {"module": module, "params": params, "ema_params": ema,
          "losses": np.asarray(jax.device_get(losses)), "seconds": time.time() - start}


def make_sampler(module: unet.UNet, edm_config: edm.EDMConfig, sampler: str, num_steps: int):
  """A jitted (params, noise [B, 8, 8, 1], labels [B] or None) -> (samples, nfe) function."""
  solve = {"euler": samplers.edm_euler, "heun": samplers.edm_heun}[sampler]

  def sample(params, noise, labels):
    denoiser = lambda x, sigma: edm.denoise(module.apply, {"params": params}, x, sigma, labels,
                                            sigma_data=edm_config.sigma_data)
    return solve(denoiser, noise, num_steps=num_steps, sigma_min=edm_config.sigma_min,
                 sigma_max=edm_config.sigma_max, rho=edm_config.rho).samples

  nfe = num_steps if sampler == "euler" else 2 * num_steps - 1
  return jax.jit(sample), nfe


def measure(module: unet.UNet, params, edm_config: edm.EDMConfig, data: digits.Digits,
            settings: Sequence = (("heun", 18), ("euler", 1), ("euler", 2), ("euler", 4),
                                  ("euler", 8)),
            num_samples: int = 1000, conditional: bool = True, seed: int = 1234,
            features: Optional[classifier.Embedder] = None) -> Dict[str, Any]:
  """FD, precision, recall and class coverage of samples from fixed noise, per (sampler, steps).

  Samples are class-balanced (label i % 10) when `conditional`, else drawn with the null label;
  features are `features` (default: a `DigitsClassifier` trained here on the train split);
  the reference set is the held-out split. The `reference_train_split` row gives the floor:
  the train split itself scored as if it were samples.
  """
  embed = features or classifier.Embedder.train(data)
  test_features, test_predictions = embed(data.test_images)

  def scores(images):
    features, predictions = embed(images)
    return {"fd": metrics.frechet_distance(features, test_features),
            **metrics.precision_recall(test_features, features),
            "class_coverage": metrics.class_coverage(predictions, digits.NUM_CLASSES,
                                                     min_fraction=0.02)}

  results = {"classifier_test_accuracy": float(np.mean(test_predictions == data.test_labels)),
             "num_samples": num_samples,
             "reference_train_split": scores(data.train_images)}
  noise = jax.random.normal(jax.random.PRNGKey(seed), (num_samples,) + digits.IMAGE_SHAPE)
  labels = jnp.arange(num_samples, dtype=jnp.int32) % digits.NUM_CLASSES if conditional else None
  for sampler, num_steps in settings:
    sample, nfe = make_sampler(module, edm_config, sampler, num_steps)
    start = time.time()
    images = np.asarray(jnp.clip(sample(params, noise, labels), -1.0, 1.0))
    results[f"{sampler}{num_steps}"] = {"nfe": nfe, **scores(images),
                                        "seconds": round(time.time() - start, 1)}
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=TeacherConfig.steps)
  parser.add_argument("--batch_size", type=int, default=TeacherConfig.batch_size)
  parser.add_argument("--channels", type=int, default=TeacherConfig.channels)
  parser.add_argument("--learning_rate", type=float, default=TeacherConfig.learning_rate)
  parser.add_argument("--seed", type=int, default=TeacherConfig.seed)
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--out", default="", help="where to write the EMA params (msgpack)")
  parser.add_argument("--results", default="", help="where to write the measurements (JSON)")
  args = parser.parse_args(argv)
  config = TeacherConfig(steps=args.steps, batch_size=args.batch_size, channels=args.channels,
                         learning_rate=args.learning_rate, seed=args.seed)
  data = digits.load()
  trained = train_teacher(config, data)
  num_params = sum(x.size for x in jax.tree.leaves(trained["ema_params"]))
  print(f"trained {num_params:,} params in {trained['seconds']:.0f}s", flush=True)
  if args.out:
    with open(args.out, "wb") as f:
      f.write(flax.serialization.to_bytes(trained["ema_params"]))
  results = {"config": dataclasses.asdict(config), "num_params": int(num_params),
             "train_seconds": round(trained["seconds"], 1),
             "final_loss": float(np.mean(trained["losses"][-200:]))}
  embed = classifier.Embedder.train(data)
  for conditional in (True, False):
    key = "conditional" if conditional else "unconditional"
    results[key] = measure(trained["module"], trained["ema_params"], config.edm(), data,
                           num_samples=args.num_samples, conditional=conditional, features=embed)
    print(key, json.dumps(results[key], indent=1), flush=True)
  if args.results:
    with open(args.results, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
