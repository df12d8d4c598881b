"""Run as a script: 3 train steps of each method on a CIFAR ResNet pair with a random batch,
under the parallel strategy of argv[1] on however many devices XLA_FLAGS gives; prints
{method: [loss after each step]} as JSON. A small learning rate: with the recipes' feature
weights (FitNets' 100) a random batch at lr 0.05 diverges within 3 steps, and diverging losses
amplify float rounding differences beyond any tolerance. `test_methods_multidevice.py` compares 1 and 8 devices."""

import json
import sys

from benchmarks.synthetic_step import build_synthetic_step

METHODS = sys.argv[2].split(",")


def main():
  from configs.cifar100 import distill  # The recipes' hyper-parameters and taps.
  results = {}
  for method in METHODS:
    config = distill.get_config(f"teacher=resnet56,student=resnet20,method={method}")
    step = build_synthetic_step("resnet20", "resnet56", num_classes=100, batch_size=16,
                                method_name=method, parallel=sys.argv[1], learning_rate=1e-3,
                                calibrate_teacher=True,
                                method_config=config[method] if method in config else None)
    losses = []
    for _ in range(3):
      step.run(1)
      losses.append(step.last_metrics()["loss"])
    results[method] = losses
  print(json.dumps(results))


if __name__ == "__main__":
  main()
