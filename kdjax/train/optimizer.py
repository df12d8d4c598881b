"""Optimizers and learning-rate schedules from `config.optimizer`."""

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int):
  """`config.schedule`: constant | cosine (to 0) | step (x `decay_factor` at `decay_steps`),
  with `warmup_steps` of linear warm-up in front."""
  base = config.learning_rate
  if config.schedule == "constant":
    schedule = optax.constant_schedule(base)
  elif config.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(base, max(num_steps - config.warmup_steps, 1))
  elif config.schedule == "step":
    schedule = optax.piecewise_constant_schedule(
        base, {int(s) - config.warmup_steps: config.decay_factor for s in config.decay_steps})
  else:
    raise ValueError(f"config.optimizer.schedule={config.schedule!r} is not valid; choose one "
                     f"of {SCHEDULES}.")
  if config.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, base, config.warmup_steps), schedule], [config.warmup_steps])
  return schedule


def build_optimizer(config: ml_collections.ConfigDict,
                    num_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (the RepDistiller recipe), Adam or AdamW."""
  lr = learning_rate_schedule(config, num_steps)
  if config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))
  if config.name == "adam":
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(lr))
  if config.name == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  raise ValueError(f"config.optimizer.name={config.name!r} is not valid; choose one of "
                   f"{OPTIMIZERS}.")
