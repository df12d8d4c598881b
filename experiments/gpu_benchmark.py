r"""GPU figures in one short run (at most ~5 minutes on one H100): one JSON line per figure.

    python -m experiments.gpu_benchmark            # on the GPU machine
    python -m experiments.gpu_benchmark --smoke    # tiny shapes, any machine (a test runs it)

Figures, each printed as soon as it is measured:
1. `kd_step`: the KD train step resnet32x4 -> resnet8x4 (CIFAR-100 shapes) at batch 64 and 256,
   kdjax (jit) against the PyTorch reference step of `experiments/torch_reference.py` (same
   models, loss 0.1 CE + 0.9 T^2 KL at T 4, SGD 0.05 / momentum 0.9 / wd 5e-4) eager and under
   `torch.compile`, on the same GPU, interleaved rounds, best of each.
2. `kd_step` ViT-S -> ViT-Ti (`vit_small` -> `vit_tiny`, 32x32 inputs, patch 4), kdjax only.
3. `lm_kd_step`: a decoder LM KD step (teacher forward, student forward/backward, token-level
   KD + CE, AdamW) in bfloat16: tokens/s and MFU (model FLOPs per token 6 N_student +
   2 N_teacher + attention, over the chip's dense bf16 peak). Needs `kdjax.models.transformer`.
4. `fused_loss_memory`: XLA's temporary memory for the gradient of token-level KD computed
   from full logits (`losses.kd`) and vocabulary-chunked from hidden states
   (`losses.fused_kd`). Needs `kdjax.losses.fused`.
A figure whose module is absent, or that the time budget leaves no room for, prints a line
`{"figure": ..., "skipped": "<why>"}` instead.

The GPU image has no ml-collections, grain, TFDS, array_record, tensorboardX or mnist1d:
this script imports only jax, flax, optax, numpy, torch and `kdjax.models` / `kdjax.losses`,
building the step from the models' apply functions (the same computation as kdjax's train
step, whose package imports the config and data stacks).
"""

import argparse
import functools
import importlib.util
import json
import sys
import time

# Dense bf16 peak FLOP/s by device kind (NVIDIA datasheets, SXM parts).
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def emit(record: dict):
  print(json.dumps(record), flush=True)


class Budget:
  """The seconds left of the script's wall-clock budget."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds

  def left(self) -> float:
    return self.deadline - time.perf_counter()


def _best_of(runs: dict, steps: int, rounds: int) -> dict:
  """{name: run(n) -> seconds}, interleaved over `rounds`; the best seconds per step."""
  best = {name: float("inf") for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      best[name] = min(best[name], run(steps) / steps)
  return best


def build_jax_kd_step(student_name: str, teacher_name: str, *, num_classes: int,
                      batch_size: int, input_shape, model_kwargs=None, seed: int = 0):
  """`run(n) -> seconds` for n KD steps on one random batch (blocking at the end)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kdjax import losses, models  # pylint: disable=g-import-not-at-top

  kwargs = model_kwargs or {}
  student = models.get_model(student_name, num_classes=num_classes, **kwargs.get("student", {}))
  teacher = models.get_model(teacher_name, num_classes=num_classes, **kwargs.get("teacher", {}))
  sample = jnp.zeros((2,) + tuple(input_shape), jnp.float32)
  student_variables = models.init_variables(student, jax.random.key(seed), sample)
  teacher_variables = models.init_variables(teacher, jax.random.key(seed + 1), sample)
  student_apply, teacher_apply = models.apply_fn(student), models.apply_fn(teacher)
  optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  params = student_variables["params"]
  model_state = {k: v for k, v in student_variables.items() if k != "params"}
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.normal(size=(batch_size,) + tuple(input_shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=batch_size), jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(carry, teacher_variables, inputs, labels):
    params, model_state, opt_state = carry
    teacher_output, _ = teacher_apply(teacher_variables, inputs, train=False, rng=None)
    teacher_logits = jax.lax.stop_gradient(teacher_output.logits)

    def loss_fn(params):
      output, new_state = student_apply({"params": params, **model_state}, inputs, train=True,
                                        rng=jax.random.key(0))
      ce = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels)
      kd = losses.kd(output.logits, teacher_logits, temperature=4.0)
      return jnp.mean(0.1 * ce + 0.9 * kd), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), {**model_state, **new_state}, opt_state), loss

  holder = {"carry": (params, model_state, optimizer.init(params))}

  def run(num_steps: int) -> float:
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      holder["carry"], loss = step(holder["carry"], teacher_variables, inputs, labels)
    jax.block_until_ready((holder["carry"], loss))
    return time.perf_counter() - start

  return run


def build_torch_kd_step(student: str, teacher: str, *, num_classes: int, batch_size: int,
                        compile_models: bool, seed: int = 0):
  """The reference step of experiments/torch_reference.py, eager or with torch.compile."""
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # As the anchors' training scripts.
  student_model = torch_reference.build_model(student, num_classes).to(device)
  teacher_model = torch_reference.build_model(teacher, num_classes).to(device)
  optimizer = torch_reference.make_optimizer(student_model)
  if compile_models:
    student_model, teacher_model = torch.compile(student_model), torch.compile(teacher_model)
  images = torch.randn(batch_size, 3, 32, 32, device=device)
  labels = torch.randint(0, num_classes, (batch_size,), device=device)

  def run(num_steps: int) -> float:
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      loss = torch_reference.kd_train_step(student_model, teacher_model, optimizer, images,
                                           labels)
    if loss is not None:
      loss.item()  # Synchronises.
    return time.perf_counter() - start

  return run


def _device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def resnet_figures(args, budget: Budget):
  torch_found = importlib.util.find_spec("torch") is not None
  student, teacher = ("resnet8", "resnet14") if args.smoke else ("resnet8x4", "resnet32x4")
  for batch_size in args.batch_sizes:
    if budget.left() < 60 and not args.smoke:
      emit({"figure": "kd_step", "batch_size": batch_size, "skipped": "time budget spent"})
      continue
    runs = {"kdjax": build_jax_kd_step(student, teacher, num_classes=100,
                                       batch_size=batch_size, input_shape=(32, 32, 3))}
    skipped = {}
    if not torch_found:
      skipped["torch_eager"] = skipped["torch_compile"] = "torch is not installed"
    else:
      runs["torch_eager"] = build_torch_kd_step(student, teacher, num_classes=100,
                                                batch_size=batch_size, compile_models=False)
      if args.smoke:
        skipped["torch_compile"] = "smoke mode (torch.compile compiles for minutes on CPU)"
      else:
        runs["torch_compile"] = build_torch_kd_step(student, teacher, num_classes=100,
                                                    batch_size=batch_size, compile_models=True)
    for run in runs.values():
      run(args.warmup)  # Compilation, cudnn autotuning.
    seconds = _best_of(runs, args.steps, args.rounds)
    record = {"figure": "kd_step", "student": student, "teacher": teacher,
              "batch_size": batch_size, **_device()}
    for name, per_step in seconds.items():
      record[f"{name}_step_ms"] = 1000 * per_step
      record[f"{name}_examples_per_sec"] = batch_size / per_step
    for name in ("torch_eager", "torch_compile"):
      if name in seconds:
        record[f"speedup_vs_{name}"] = seconds[name] / seconds["kdjax"]
      else:
        record[f"{name}_skipped"] = skipped[name]
    emit(record)


def vit_figure(args, budget: Budget):
  if budget.left() < 45 and not args.smoke:
    emit({"figure": "kd_step", "student": "vit_tiny", "skipped": "time budget spent"})
    return
  batch_size = 4 if args.smoke else 256
  small = {"depth": 1} if args.smoke else {}
  run = build_jax_kd_step("vit_tiny", "vit_small", num_classes=100, batch_size=batch_size,
                          input_shape=(32, 32, 3),
                          model_kwargs={"student": small, "teacher": small})
  run(args.warmup)
  per_step = _best_of({"kdjax": run}, args.steps, args.rounds)["kdjax"]
  emit({"figure": "kd_step", "student": "vit_tiny", "teacher": "vit_small",
        "batch_size": batch_size, "kdjax_step_ms": 1000 * per_step,
        "kdjax_examples_per_sec": batch_size / per_step, **_device(),
        **({"depth": 1} if args.smoke else {})})


def _lm_sizes(smoke: bool):
  if smoke:
    return dict(vocab=64, length=16, batch=2,
                student=dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32),
                teacher=dict(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64))
  return dict(vocab=32_000, length=1024, batch=16,
              student=dict(num_layers=8, embed_dim=512, num_heads=8, mlp_dim=1408),
              teacher=dict(num_layers=12, embed_dim=1024, num_heads=16, mlp_dim=2816))


def lm_figure(args, budget: Budget):
  if importlib.util.find_spec("kdjax.models.transformer") is None:
    emit({"figure": "lm_kd_step", "skipped": "kdjax.models.transformer is not in this kdjax"})
    return
  if budget.left() < 45 and not args.smoke:
    emit({"figure": "lm_kd_step", "skipped": "time budget spent"})
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kdjax import losses, models  # pylint: disable=g-import-not-at-top
  from kdjax.models import transformer  # pylint: disable=g-import-not-at-top

  sizes = _lm_sizes(args.smoke)
  vocab, length, batch = sizes["vocab"], sizes["length"], sizes["batch"]
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  student = transformer.TransformerLM(vocab_size=vocab, max_length=length, dtype=dtype,
                                      **sizes["student"])
  teacher = transformer.TransformerLM(vocab_size=vocab, max_length=length, dtype=dtype,
                                      **sizes["teacher"])
  sample = jnp.zeros((1, length), jnp.int32)
  student_params = models.init_variables(student, jax.random.key(0), sample)["params"]
  teacher_variables = models.init_variables(teacher, jax.random.key(1), sample)
  student_apply, teacher_apply = models.apply_fn(student), models.apply_fn(teacher)
  optimizer = optax.adamw(3e-4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length + 1)),
                       jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(carry, teacher_variables):
    params, opt_state = carry
    teacher_logits = jax.lax.stop_gradient(
        teacher_apply(teacher_variables, inputs, train=False, rng=None)[0].logits)

    def loss_fn(params):
      logits = student_apply({"params": params}, inputs, train=True, rng=None)[0].logits
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return jnp.mean(0.5 * ce + 0.5 * losses.kd(logits, teacher_logits, temperature=1.0))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  holder = {"carry": (student_params, optimizer.init(student_params))}

  def run(num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      holder["carry"], loss = step(holder["carry"], teacher_variables)
    jax.block_until_ready(loss)
    return time.perf_counter() - start

  run(args.warmup)
  per_step = _best_of({"lm": run}, args.steps, args.rounds)["lm"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  n_student, n_teacher = count(student_params), count(teacher_variables["params"])
  attention = lambda s: 2 * s["num_layers"] * length * s["embed_dim"]  # QK^T and AV, per token.
  # Per token: forward 2N (+ attention), backward twice the forward; the teacher only forward.
  flops_per_token = (6 * n_student + 3 * attention(sizes["student"])
                     + 2 * n_teacher + attention(sizes["teacher"]))
  tokens_per_sec = batch * length / per_step
  device = _device()
  peak = next((v for k, v in _PEAK_BF16_FLOPS.items() if k in device["device_kind"]), None)
  emit({"figure": "lm_kd_step", "tokens_per_sec": tokens_per_sec, "step_ms": 1000 * per_step,
        "student_params": n_student, "teacher_params": n_teacher, "vocab": vocab,
        "sequence_length": length, "batch_size": batch, "dtype": jnp.dtype(dtype).name,
        "model_flops_per_token": flops_per_token,
        "mfu": tokens_per_sec * flops_per_token / peak if peak else None,
        "peak_flops": peak, **device})


def fused_memory_figure(args, budget: Budget):
  if importlib.util.find_spec("kdjax.losses.fused") is None:
    emit({"figure": "fused_loss_memory", "skipped": "kdjax.losses.fused is not in this kdjax"})
    return
  if budget.left() < 20 and not args.smoke:
    emit({"figure": "fused_loss_memory", "skipped": "time budget spent"})
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kdjax import losses  # pylint: disable=g-import-not-at-top

  tokens, width, vocab = (64, 16, 256) if args.smoke else (8192, 1024, 128_256)
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
            ((tokens, width), (width, vocab), (tokens, width), (width, vocab))]

  def full(hs, ws, ht, wt):
    return jnp.mean(losses.kd(hs @ ws, ht @ wt, temperature=1.0))

  def fused(hs, ws, ht, wt):
    return jnp.mean(losses.fused_kd(hs, ws, ht, wt, temperature=1.0))

  record = {"figure": "fused_loss_memory", "tokens": tokens, "hidden": width, "vocab": vocab,
            "dtype": "bfloat16", **_device()}
  for name, fn in (("full_logits", full), ("fused", fused)):
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    analysis = compiled.memory_analysis()
    record[f"{name}_temp_bytes"] = (int(analysis.temp_size_in_bytes)
                                    if analysis is not None else None)
  if record["full_logits_temp_bytes"] and record["fused_temp_bytes"]:
    record["memory_ratio"] = record["full_logits_temp_bytes"] / record["fused_temp_bytes"]
  emit(record)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes, one step (a test).")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps per round.")
  parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (best kept).")
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps (compilation).")
  parser.add_argument("--budget_s", type=float, default=270.0,
                      help="Wall-clock seconds after which the remaining figures are skipped.")
  args = parser.parse_args(argv)
  args.steps = args.steps or (1 if args.smoke else 20)
  args.rounds = args.rounds or (1 if args.smoke else 3)
  args.warmup = 1 if args.smoke else args.warmup
  args.batch_sizes = (2,) if args.smoke else (64, 256)
  for name in ("steps", "rounds", "warmup"):
    if getattr(args, name) <= 0:
      print(f"Error: --{name} must be a positive integer, got {getattr(args, name)}.",
            file=sys.stderr)
      sys.exit(2)
  return args


def main(argv=None):
  args = parse_args(argv)
  budget = Budget(args.budget_s)
  emit({"figure": "start", "smoke": args.smoke, **_device()})
  resnet_figures(args, budget)
  vit_figure(args, budget)
  lm_figure(args, budget)
  fused_memory_figure(args, budget)


if __name__ == "__main__":
  main()
