"""Frozen-teacher forward: original vs BatchNorm-folded vs folded + bfloat16.

    python -m experiments.teacher_benchmark --model resnet32x4 --batch 64

Times the jitted eval-mode forward of `--model` (random weights, perturbed, with
BatchNorm statistics calibrated on the input batch; CIFAR-sized inputs) as built, after
`kdjax.models.fold.fold_batch_norm`, and folded with a bfloat16 compute dtype,
interleaved, best of `--repeats`; reports speed-ups over the original, the max
absolute / relative logit differences and the argmax agreement. Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import get_model
from kdjax.models.fold import fold_batch_norm


def calibrate_batch_stats(module, variables, inputs):
  """`variables` with every BatchNorm's running statistics set to its input's batch statistics.

  A random network's default statistics (mean 0, variance 1) let deep ResNet activations grow
  by orders of magnitude (logits ~1e13 for resnet32x4), which makes relative errors
  meaningless; a trained teacher's statistics match its data. One train-mode pass: there each
  BatchNorm normalises with exactly these batch statistics, so the eval-mode network on
  `inputs` computes what the train-mode one did.
  """
  stats = {}

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
      x = args[0].astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      stats[tuple(mod.scope.path)] = (mean, jnp.mean(jnp.square(x), axes) - mean**2)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    module.apply(variables, inputs, train=True, mutable=["batch_stats"])
  batch_stats = jax.tree.map(lambda x: x, variables["batch_stats"])
  for path, (mean, var) in stats.items():
    node = batch_stats
    for key in path:
      node = node[key]
    node["mean"], node["var"] = mean, var
  return {**variables, "batch_stats": batch_stats}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet32x4")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  module = get_model(args.model, num_classes=args.num_classes)
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  variables = module.init(jax.random.key(1), x[:1], train=False)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = jax.tree.unflatten(treedef, [
      leaf + 0.2 * jnp.abs(jax.random.normal(k, leaf.shape))
      for leaf, k in zip(leaves, keys)])
  variables = calibrate_batch_stats(module, variables, x)

  original = jax.jit(lambda v, x: module.apply(v, x, train=False).logits)
  fold_apply, folded = fold_batch_norm(module, variables, x)
  bf16_apply, folded_bf16 = fold_batch_norm(module, variables, x,
                                            dtype=jnp.bfloat16)
  variants = {
      "original": (original, variables),
      "folded": (jax.jit(lambda v, x: fold_apply(v, x)[0].logits), folded),
      "folded+bf16": (jax.jit(lambda v, x: bf16_apply(v, x)[0].logits),
                      folded_bf16),
  }
  outputs = {k: np.asarray(jax.block_until_ready(f(v, x)))
             for k, (f, v) in variants.items()}
  times = {k: [] for k in variants}
  for _ in range(args.repeats):
    for k, (f, v) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(f(v, x))
      times[k].append(time.perf_counter() - start)
  ref = outputs["original"]
  rows = []
  for k in variants:
    diff = np.abs(outputs[k] - ref)
    rows.append({
        "variant": k, "best_ms": 1e3 * min(times[k]),
        "speedup": min(times["original"]) / min(times[k]),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / np.abs(ref).max()),
        "argmax_agreement": float((outputs[k].argmax(-1)
                                   == ref.argmax(-1)).mean())})
  print(f"{args.model}, batch {args.batch}, backend {jax.default_backend()}")
  print("| variant | best ms | speed-up | max abs diff | max diff / max "
        "|logit| | argmax agreement |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['variant']} | {r['best_ms']:.1f} | {r['speedup']:.2f}x | "
          f"{r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} | "
          f"{r['argmax_agreement']:.3f} |")
  print(json.dumps({"benchmark": "teacher_forward", "model": args.model,
                    "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
  main()
