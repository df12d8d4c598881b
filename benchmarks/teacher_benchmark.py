"""Teacher forward and KD train step, float32 vs bfloat16 and BatchNorm folding (issue 12).

    python -m benchmarks.teacher_benchmark --model resnet32x4 --student resnet8x4 --batch 32

One invocation reports (i) the jitted eval-mode forward of the teacher `--model` (random
weights, perturbed, with BatchNorm statistics calibrated on the input batch; CIFAR-sized
inputs) built the way a run builds it from `config.teacher.dtype` / `fold_batch_norm`
(`kdjax.teachers.live.frozen_teacher`): float32, bfloat16, folded and folded + bfloat16,
with speed-ups over float32, the max absolute / relative logit differences and the argmax
agreement; (ii) the jitted KD train step (`kdjax.train.step.make_train_step`, method kd, SGD)
of `--student` taught by the float32 teacher, with `config.dtype` float32 vs bfloat16
(`kdjax.models.precision.model_fns`), and the loss / logit differences after one step.
Variants are timed interleaved, best of `--repeats`. Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import methods
from kdjax.models import get_model, precision
from kdjax.train import state as state_lib, step as step_lib
from kdjax.teachers.live import frozen_teacher


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


def _best_times(variants: dict, repeats: int) -> dict:
  """name -> best wall-clock seconds of `fn(*args)`, interleaved (a busy machine slows
  every variant alike)."""
  times = {k: [] for k in variants}
  for _ in range(repeats):
    for k, (fn, args) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - start)
  return {k: min(v) for k, v in times.items()}


def teacher_forward_rows(model: str, variables, x, *, num_classes: int, repeats: int):
  """The four teacher variants of a run's config: rows of speed and agreement."""
  variants, outputs = {}, {}
  for name, dtype, fold in (("float32", "float32", False), ("bfloat16", "bfloat16", False),
                            ("folded", "float32", True), ("folded+bf16", "bfloat16", True)):
    config = ml_collections.ConfigDict(dict(num_classes=num_classes, teacher=dict(
        dtype=dtype, fold_batch_norm=fold)))
    apply, teacher_variables = frozen_teacher(
        model, precision.model_fns(model, num_classes=num_classes).apply, variables,
        config=config, sample_inputs=x, model_kwargs={})
    forward = jax.jit(lambda v, x, apply=apply: apply(v, x, train=False, rng=None)[0].logits)
    outputs[name] = np.asarray(jax.block_until_ready(forward(teacher_variables, x)))
    variants[name] = (forward, (teacher_variables, x))
  best = _best_times(variants, repeats)
  ref = outputs["float32"]
  rows = []
  for k in variants:
    diff = np.abs(outputs[k] - ref)
    rows.append({
        "variant": k, "best_ms": 1e3 * best[k], "speedup": best["float32"] / best[k],
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / np.abs(ref).max()),
        "argmax_agreement": float((outputs[k].argmax(-1) == ref.argmax(-1)).mean())})
  return rows


def train_step_rows(teacher: str, teacher_variables, student: str, x, *, num_classes: int,
                    repeats: int):
  """The KD train step with the student in float32 and in bfloat16 (`config.dtype`)."""
  teacher_apply = precision.model_fns(teacher, num_classes=num_classes).apply
  labels = np.arange(x.shape[0]) % num_classes
  batch = {"inputs": x, "labels": labels}
  method_class = methods.get_method_class("kd")
  method = method_class(method_class.default_config())
  optimizer = optax.sgd(0.01, momentum=0.9)
  ops = methods.single_device_ops()
  variants, results = {}, {}
  for dtype in ("float32", "bfloat16"):
    fns = precision.model_fns(student, num_classes=num_classes, dtype=dtype)
    student_variables = jax.jit(fns.init)(jax.random.key(3), x[:2])
    state = state_lib.create(student_variables=student_variables, method_params={},
                             method_state={}, optimizer=optimizer, rng=jax.random.PRNGKey(0))
    pure = step_lib.make_train_step(student_apply=fns.apply, teacher_apply=teacher_apply,
                                    method=method, optimizer=optimizer)
    step = jax.jit(lambda s, t, b, pure=pure: pure(s, t, b, ops))
    new_state, metrics = jax.block_until_ready(step(state, teacher_variables, batch))
    logits = jax.jit(lambda v, apply=fns.apply: apply(v, x, train=False)[0].logits)(
        {"params": new_state.params["student"], **new_state.model_state})
    results[dtype] = (float(metrics["loss"]), np.asarray(logits),
                      {str(leaf.dtype) for leaf in jax.tree.leaves(new_state.params)})
    variants[dtype] = (step, (state, teacher_variables, batch))
  best = _best_times(variants, repeats)
  ref_loss, ref_logits, _ = results["float32"]
  rows = []
  for k, (loss, logits, param_dtypes) in results.items():
    rows.append({
        "variant": f"config.dtype={k}", "best_ms": 1e3 * best[k],
        "speedup": best["float32"] / best[k], "loss": loss,
        "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        "logit_rel_diff": float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()),
        "argmax_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "param_dtypes": sorted(param_dtypes)})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet32x4", help="the teacher")
  parser.add_argument("--student", default="resnet8x4",
                      help="the KD step's student; empty: no train-step benchmark")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  module = get_model(args.model, num_classes=args.num_classes)
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  variables = jax.jit(lambda x: module.init(jax.random.key(1), x[:1], train=False))(x)
  rng = np.random.default_rng(2)  # |noise| keeps running variances positive.
  variables = jax.tree.map(
      lambda leaf: leaf + 0.2 * np.abs(rng.normal(size=leaf.shape)).astype(np.float32),
      variables)
  variables = jax.device_get(calibrate_batch_stats(module, variables, x))

  backend = jax.default_backend()
  forward = teacher_forward_rows(args.model, variables, x, num_classes=args.num_classes,
                                 repeats=args.repeats)
  print(f"teacher forward: {args.model}, batch {args.batch}, backend {backend}")
  print("| teacher | best ms | speed-up | max abs diff | max diff / max |logit| | "
        "argmax agreement |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for r in forward:
    print(f"| {r['variant']} | {r['best_ms']:.1f} | {r['speedup']:.2f}x | "
          f"{r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} | "
          f"{r['argmax_agreement']:.3f} |")
  steps = []
  if args.student:
    steps = train_step_rows(args.model, variables, args.student, x,
                            num_classes=args.num_classes, repeats=args.repeats)
    print(f"\nKD train step: {args.model} -> {args.student}, batch {args.batch}, "
          f"backend {backend}")
    print("| student | best ms | speed-up | loss | loss rel diff | logit diff / max |logit| "
          "after 1 step | argmax agreement | parameter dtypes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in steps:
      print(f"| {r['variant']} | {r['best_ms']:.1f} | {r['speedup']:.2f}x | {r['loss']:.4f} | "
            f"{r['loss_rel_diff']:.2e} | {r['logit_rel_diff']:.2e} | "
            f"{r['argmax_agreement']:.3f} | {', '.join(r['param_dtypes'])} |")
  print(json.dumps({"benchmark": "teacher_forward", "model": args.model,
                    "student": args.student, "batch": args.batch, "backend": backend,
                    "rows": forward, "train_step_rows": steps}))


if __name__ == "__main__":
  main()
