"""Run as a script: `python tests/diffusion/multidevice_run.py WORKDIR METHOD[,METHOD...]`
trains each diffusion method 3 steps (the smoke quickstart's config, batch 8, a loss logged
every step) on however many devices XLA_FLAGS gives, and prints {method: [loss per step]} as
JSON. `test_runs.py` compares 1 and 8 forced host devices."""

import json
import os
import sys

import jax

from configs import diffusion_quickstart
from kdjax import train


def main():
  workdir, methods = sys.argv[1], sys.argv[2].split(",")
  config = diffusion_quickstart.get_config("smoke")
  config.suite = ",".join(methods)
  config.num_steps = 3
  config.eval_batch_size = 40  # Divisible by 8 (the held-out 300 are padded).
  config.data_dir = os.path.join(workdir, "data")
  config.log_every_steps = 1
  config.eval_every_steps = config.checkpoint_every_steps = 3
  config.progressive.rounds = 1
  for method in ("progressive", "consistency", "dmd"):
    config[method].eval_samples = 10
  train.run_suite(config, workdir, num_devices=jax.device_count())
  losses = {}
  for method in methods:
    run = method if os.path.isdir(os.path.join(workdir, method)) else f"{method}_1"  # Rounds.
    with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    losses[method] = [line["loss"] for line in lines if line.get("split") == "train"]
  print(json.dumps(losses))


if __name__ == "__main__":
  main()
