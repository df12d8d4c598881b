r"""GPU figures in one short run (at most ~5 minutes on one H100): one JSON line per figure.

    python -m benchmarks.gpu_benchmark            # on the GPU machine
    python -m benchmarks.gpu_benchmark --smoke    # tiny shapes, any machine (a test runs it)

Figures, each printed as soon as it is measured:
1. `kd_step`: the KD train step resnet32x4 -> resnet8x4 (CIFAR-100 shapes) at batch 256 and 64,
   kdjax (jit) against the PyTorch reference step of `benchmarks/torch_reference.py` (same
   models, loss 0.1 CE + 0.9 T^2 KL at T 4, SGD 0.05 / momentum 0.9 / wd 5e-4) eager and under
   `torch.compile`, on the same GPU, interleaved rounds, best of each. Beside them, in the same
   rounds: kdjax and torch eager with bfloat16 compute (float32 parameters; `config.dtype`, and
   `torch.autocast` around the forward passes), and kdjax with the teacher's logits computed
   before the loop (`kdjax_teacher_precomputed`: the step a `config.teacher.cache` run takes,
   student forward/backward only, an upper bound on reading top-k logits from the cache).
2. `kd_step` ViT-S -> ViT-Ti (`vit_small` -> `vit_tiny`, 32x32 inputs, patch 4, batch 256),
   the same runs as 1 against the PyTorch ViTs of `benchmarks/torch_vit.py` (timm's
   definition; a test checks they compute kdjax's logits on kdjax's weights).
3. `lm_kd_step`: a decoder LM KD step (teacher forward, student forward/backward, token-level
   KD + CE, AdamW) in bfloat16: tokens/s and MFU (model FLOPs per token 6 N_student +
   2 N_teacher + attention, over the chip's dense bf16 peak). Needs `kdjax.models.transformer`.
4. `fused_loss`: the generalized JSD (beta 0.5) and its gradient at `[4, 2048, 128256]`, hidden
   2048, bfloat16: vocabulary-chunked from hidden states (`losses.fused_generalized_jsd`), from
   full logits (`losses.generalized_jsd` on `hidden @ unembedding`) and TRL's
   `generalized_jsd_loss` (re-stated in PyTorch in `benchmarks/fused_loss_benchmark.py`) on the
   same GPU: milliseconds, XLA's compiled temporary memory and the measured peak device memory.
5. `teacher_forward`: the frozen resnet32x4 teacher's eval forward at batch 256: float32,
   bfloat16, BatchNorm folded (`kdjax.models.fold`) and folded + bfloat16; speed-ups over
   float32, the largest logit difference and top-1 agreement with float32.
A figure whose module is absent, or that the time budget leaves no room for, prints a line
`{"figure": ..., "skipped": "<why>"}` instead; one that fails prints `{"figure": ..., "error":
"<exception>"}` and the script goes on to the next (the GPU image's jax is newer than this
machine's, and a device call is too short to lose to one figure).

The GPU image has no ml-collections, grain, TFDS, array_record, tensorboardX or mnist1d:
this script imports only jax, flax, optax, numpy, torch and `kdjax.models` / `kdjax.losses`,
building the step from the models' apply functions (the same computation as kdjax's train
step, whose package imports the config and data stacks).
"""

import argparse
import functools
import importlib
import importlib.util
import json
import sys
import os
import time
import traceback

# torch and jax share the GPU here: jax must not take 75% of its memory at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
                      batch_size: int, input_shape, model_kwargs=None, seed: int = 0,
                      dtype: str = "float32", teacher_precomputed: bool = False):
  """`run(n) -> seconds` for n KD steps on one random batch (blocking at the end).

  `dtype`: the compute dtype of student and teacher (`config.dtype`; parameters stay float32).
  `teacher_precomputed`: the teacher's logits are computed once before the loop and passed to
  the step, which runs the student only (the cost of a `config.teacher.cache` step).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kdjax import losses, models  # pylint: disable=g-import-not-at-top
  from kdjax.models import precision  # pylint: disable=g-import-not-at-top

  kwargs = model_kwargs or {}
  cast = {} if dtype == "float32" else {"dtype": precision.compute_dtype(dtype)}
  student = models.get_model(student_name, num_classes=num_classes,
                             **kwargs.get("student", {}), **cast)
  teacher = models.get_model(teacher_name, num_classes=num_classes,
                             **kwargs.get("teacher", {}), **cast)
  sample = jnp.zeros((2,) + tuple(input_shape), jnp.float32)
  student_variables = models.init_variables(student, jax.random.key(seed), sample)
  teacher_variables = models.init_variables(teacher, jax.random.key(seed + 1), sample)
  student_apply = precision.mixed_precision(models.apply_fn(student), dtype)
  teacher_apply = precision.mixed_precision(models.apply_fn(teacher), dtype)
  optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  params = student_variables["params"]
  model_state = {k: v for k, v in student_variables.items() if k != "params"}
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.normal(size=(batch_size,) + tuple(input_shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=batch_size), jnp.int32)

  def teacher_logits_of(teacher_variables, inputs):
    output, _ = teacher_apply(teacher_variables, inputs, train=False, rng=None)
    return jax.lax.stop_gradient(output.logits)

  def student_update(carry, teacher_logits, inputs, labels):
    params, model_state, opt_state = carry

    def loss_fn(params):
      output, new_state = student_apply({"params": params, **model_state}, inputs, train=True,
                                        rng=jax.random.key(0))
      ce = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels)
      kd = losses.kd(output.logits, teacher_logits, temperature=4.0)
      return jnp.mean(0.1 * ce + 0.9 * kd), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), {**model_state, **new_state}, opt_state), loss

  if teacher_precomputed:
    teacher_input = jax.block_until_ready(jax.jit(teacher_logits_of)(teacher_variables, inputs))
    step = jax.jit(student_update, donate_argnums=(0,))
  else:
    teacher_input = teacher_variables

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry, teacher_variables, inputs, labels):
      return student_update(carry, teacher_logits_of(teacher_variables, inputs), inputs, labels)

  holder = {"carry": (params, model_state, optimizer.init(params))}

  def run(num_steps: int) -> float:
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      holder["carry"], loss = step(holder["carry"], teacher_input, inputs, labels)
    jax.block_until_ready((holder["carry"], loss))
    return time.perf_counter() - start

  return run


def build_torch_kd_step(student: str, teacher: str, *, num_classes: int, batch_size: int,
                        compile_models: bool, seed: int = 0, bfloat16: bool = False,
                        model_kwargs=None):
  """The reference step of benchmarks/torch_reference.py, eager or with torch.compile.

  `bfloat16`: the forward passes run under `torch.autocast(dtype=torch.bfloat16)` (PyTorch's
  mixed precision: float32 parameters and optimizer, bfloat16 convolutions and matmuls).
  `model_kwargs`: {'student': {...}, 'teacher': {...}}, as `build_jax_kd_step`'s.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # As the anchors' training scripts.
    # float32 matmuls in TF32, as XLA's default precision on GPU does (and as cuDNN's
    # convolutions already do in both): PyTorch's own default is full float32 matmuls, which
    # would slow the matmul-bound ViT reference for a reason unrelated to the framework.
    torch.backends.cuda.matmul.allow_tf32 = True
  kwargs = model_kwargs or {}
  student_model = torch_reference.build_model(student, num_classes,
                                              **kwargs.get("student", {})).to(device)
  teacher_model = torch_reference.build_model(teacher, num_classes,
                                              **kwargs.get("teacher", {})).to(device)
  optimizer = torch_reference.make_optimizer(student_model)
  if compile_models:
    student_model, teacher_model = torch.compile(student_model), torch.compile(teacher_model)
  images = torch.randn(batch_size, 3, 32, 32, device=device)
  labels = torch.randint(0, num_classes, (batch_size,), device=device)

  def amp_step():
    # kd_train_step with autocast around the forward passes only (PyTorch's AMP recipe:
    # backward outside autocast runs each op in the dtype its forward chose).
    student_model.train()
    teacher_model.eval()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      with torch.no_grad():
        teacher_logits = teacher_model(images)
      loss = torch_reference.kd_loss(student_model(images), teacher_logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  def run(num_steps: int) -> float:
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      if bfloat16:
        loss = amp_step()
      else:
        loss = torch_reference.kd_train_step(student_model, teacher_model, optimizer, images,
                                             labels)
    if loss is not None:
      loss.item()  # Synchronises.
    return time.perf_counter() - start

  return run


def _device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def _precision_settings() -> dict:
  """What float32 convolutions and matmuls may use (TF32) in each framework."""
  import jax  # pylint: disable=g-import-not-at-top
  settings = {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision}
  if importlib.util.find_spec("torch") is not None:
    import torch  # pylint: disable=g-import-not-at-top
    settings.update(torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
  return settings


def _kd_step_figure(args, budget: Budget, student: str, teacher: str, batch_size: int, *,
                    model_kwargs=None, extra=None):
  """One `kd_step` record: kdjax float32 / bfloat16 / teacher precomputed against PyTorch
  eager / eager bf16 autocast / `torch.compile` on the same models, interleaved rounds."""
  torch_found = importlib.util.find_spec("torch") is not None
  shapes = dict(num_classes=100, batch_size=batch_size, model_kwargs=model_kwargs)
  runs = {"kdjax": build_jax_kd_step(student, teacher, input_shape=(32, 32, 3), **shapes),
          "kdjax_bf16": build_jax_kd_step(student, teacher, input_shape=(32, 32, 3),
                                          dtype="bfloat16", **shapes),
          "kdjax_teacher_precomputed": build_jax_kd_step(
              student, teacher, input_shape=(32, 32, 3), teacher_precomputed=True, **shapes)}
  skipped = {}
  if not torch_found:
    for name in ("torch_eager", "torch_eager_bf16", "torch_compile"):
      skipped[name] = "torch is not installed"
  else:
    runs["torch_eager"] = build_torch_kd_step(student, teacher, compile_models=False, **shapes)
    runs["torch_eager_bf16"] = build_torch_kd_step(student, teacher, compile_models=False,
                                                   bfloat16=True, **shapes)
    if args.smoke or args.no_torch_compile or budget.left() < 150:
      skipped["torch_compile"] = (
          "smoke mode (torch.compile compiles for minutes on CPU)" if args.smoke else
          "--no_torch_compile" if args.no_torch_compile else
          "time budget: torch.compile needs about a minute")
    else:
      runs["torch_compile"] = build_torch_kd_step(student, teacher, compile_models=True,
                                                  **shapes)
  for run in runs.values():
    run(args.warmup)  # Compilation, cudnn autotuning.
  seconds = _best_of(runs, args.steps, args.rounds)
  record = {"figure": "kd_step", "student": student, "teacher": teacher,
            "batch_size": batch_size, **(extra or {}), **_device(), **_precision_settings()}
  for name, per_step in seconds.items():
    record[f"{name}_step_ms"] = 1000 * per_step
    record[f"{name}_examples_per_sec"] = batch_size / per_step
  for name in ("torch_eager", "torch_compile"):
    if name in seconds:
      record[f"speedup_vs_{name}"] = seconds[name] / seconds["kdjax"]
    else:
      record[f"{name}_skipped"] = skipped[name]
  if "torch_eager_bf16" in seconds:
    record["bf16_speedup_vs_torch_eager_bf16"] = (seconds["torch_eager_bf16"]
                                                  / seconds["kdjax_bf16"])
  else:
    record["torch_eager_bf16_skipped"] = skipped["torch_eager_bf16"]
  record["teacher_precomputed_vs_live"] = (seconds["kdjax"]
                                           / seconds["kdjax_teacher_precomputed"])
  emit(record)


def resnet_figures(args, budget: Budget, *, batch_sizes=None):
  student, teacher = ("resnet8", "resnet14") if args.smoke else ("resnet8x4", "resnet32x4")
  for batch_size in batch_sizes or args.batch_sizes:
    if budget.left() < 60 and not args.smoke:
      emit({"figure": "kd_step", "batch_size": batch_size, "skipped": "time budget spent"})
      continue
    _kd_step_figure(args, budget, student, teacher, batch_size)


def vit_figure(args, budget: Budget):
  if budget.left() < 45 and not args.smoke:
    emit({"figure": "kd_step", "student": "vit_tiny", "skipped": "time budget spent"})
    return
  small = {"depth": 1} if args.smoke else {}
  _kd_step_figure(args, budget, "vit_tiny", "vit_small", 4 if args.smoke else 256,
                  model_kwargs={"student": small, "teacher": small},
                  extra={"depth": 1} if args.smoke else None)


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


def fused_loss_figure(args, budget: Budget):
  if importlib.util.find_spec("kdjax.losses.fused") is None:
    emit({"figure": "fused_loss", "skipped": "kdjax.losses.fused is not in this kdjax"})
    return
  if budget.left() < 40 and not args.smoke:
    emit({"figure": "fused_loss", "skipped": "time budget spent"})
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kdjax import losses  # pylint: disable=g-import-not-at-top

  batch, seq, width, vocab = (2, 16, 16, 256) if args.smoke else (4, 2048, 2048, 128_256)
  rng = np.random.default_rng(0)
  scale = 3 / np.sqrt(width)
  host = [rng.normal(size=(batch, seq, width)), scale * rng.normal(size=(width, vocab)),
          rng.normal(size=(batch, seq, width)), scale * rng.normal(size=(width, vocab))]
  arrays = [jnp.asarray(a, jnp.bfloat16) for a in host]

  def fused(vocab_chunk, token_chunk):
    def loss(hs, ws, ht, wt):
      return jnp.mean(losses.fused_generalized_jsd(
          hs, ws, ht, wt, beta=0.5, vocab_chunk_size=min(vocab_chunk, vocab),
          token_chunk_size=token_chunk))
    return loss

  def full_logits(hs, ws, ht, wt):
    logits = lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32)
    return jnp.mean(losses.generalized_jsd(logits(hs, ws), logits(ht, wt), beta=0.5))

  # "fused" is the first chunking (the library's defaults unless --fused_chunks says
  # otherwise), the others are fused_<vocab>x<tokens>; chunkings equal once the vocabulary
  # chunk is capped at the vocabulary are timed once.
  chunks = list(dict.fromkeys((min(v, vocab), t) for v, t in args.fused_chunks))
  record = {"figure": "fused_loss", "loss": "generalized_jsd beta 0.5, value and gradient",
            "shape": [batch, seq, vocab], "hidden": width, "dtype": "bfloat16",
            "fused_chunks": [f"{v}x{t}" for v, t in chunks], **_device()}
  variants = [(f"fused_{v}x{t}", fused(v, t)) for v, t in chunks]
  variants = [("fused", variants[0][1])] + variants[1:] + [("full_logits", full_logits)]
  runs = {}
  for name, fn in variants:
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*arrays).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
      record[f"{name}_temp_bytes"] = int(analysis.temp_size_in_bytes)

    def run(n, compiled=compiled):
      start = time.perf_counter()
      for _ in range(n):
        out = compiled(*arrays)
      jax.block_until_ready(out)
      return time.perf_counter() - start
    runs[name] = run
  if importlib.util.find_spec("torch") is not None:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks.fused_loss_benchmark import trl_generalized_jsd_loss  # pylint: disable=g-import-not-at-top
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hs, ws, ht, wt = [torch.tensor(a, dtype=torch.bfloat16, device=device) for a in host]

    def run_trl(n):
      start = time.perf_counter()
      for _ in range(n):
        a, b = hs.detach().requires_grad_(), ws.detach().requires_grad_()
        loss = trl_generalized_jsd_loss(a @ b, ht @ wt, beta=0.5)
        loss.backward()
      loss.item()  # Synchronises.
      return time.perf_counter() - start
    runs["trl_torch"] = run_trl
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
      base = torch.cuda.memory_allocated()
      run_trl(1)
      record["trl_torch_peak_bytes_over_inputs"] = int(torch.cuda.max_memory_allocated() - base)
  else:
    record["trl_torch_skipped"] = "torch is not installed"
  for run in runs.values():
    run(1)
  seconds = _best_of(runs, 1 if args.smoke else 5, args.rounds)
  for name, per_step in seconds.items():
    record[f"{name}_ms"] = 1000 * per_step
  record["fused_speed_vs_full_logits"] = seconds["full_logits"] / seconds["fused"]
  if "trl_torch" in seconds:
    record["fused_speed_vs_trl_torch"] = seconds["trl_torch"] / seconds["fused"]
    for name, _ in variants[1:-1]:
      record[f"{name}_speed_vs_trl_torch"] = seconds["trl_torch"] / seconds[name]
  if record.get("full_logits_temp_bytes") and record.get("fused_temp_bytes"):
    record["memory_ratio"] = record["full_logits_temp_bytes"] / record["fused_temp_bytes"]
  emit(record)


def teacher_forward_figure(args, budget: Budget):
  if budget.left() < 30 and not args.smoke:
    emit({"figure": "teacher_forward", "skipped": "time budget spent"})
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  from kdjax.models import fold, precision  # pylint: disable=g-import-not-at-top

  name, batch_size = ("resnet14", 4) if args.smoke else ("resnet32x4", 256)
  teacher = models.get_model(name, num_classes=100)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32)
  variables = models.init_variables(teacher, jax.random.key(0), inputs[:2])
  # Non-trivial statistics, as a trained teacher has (init's are mean 0, variance 1).
  stats = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
  perturbed = {}
  for path, leaf in stats:
    key = jax.random.fold_in(jax.random.key(1), len(perturbed))
    is_var = "var" in str(path[-1])
    perturbed[path] = (0.5 + jax.random.uniform(key, leaf.shape) if is_var
                       else 0.1 * jax.random.normal(key, leaf.shape))
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda path, leaf: perturbed[path], variables["batch_stats"])
  plain = models.apply_fn(teacher)
  bf16 = precision.mixed_precision(
      models.apply_fn(models.get_model(name, num_classes=100, dtype=jnp.bfloat16)), "bfloat16")
  folded_apply, folded_variables = fold.fold_batch_norm(teacher, variables, inputs)
  folded_bf16_apply, folded_bf16_variables = fold.fold_batch_norm(teacher, variables, inputs,
                                                                  dtype=jnp.bfloat16)
  variants = {"float32": (plain, variables), "bfloat16": (bf16, variables),
              "folded": (folded_apply, folded_variables),
              "folded_bfloat16": (folded_bf16_apply, folded_bf16_variables)}
  forwards, logits = {}, {}
  for key, (apply, v) in variants.items():
    forward = jax.jit(lambda v, x, apply=apply: apply(v, x, train=False, rng=None)[0].logits)
    logits[key] = np.asarray(jax.block_until_ready(forward(v, inputs)), np.float32)

    def run(n, forward=forward, v=v):
      start = time.perf_counter()
      for _ in range(n):
        out = forward(v, inputs)
      jax.block_until_ready(out)
      return time.perf_counter() - start
    forwards[key] = run
  seconds = _best_of(forwards, 1 if args.smoke else args.steps, args.rounds)
  reference = logits["float32"]
  record = {"figure": "teacher_forward", "teacher": name, "batch_size": batch_size, **_device()}
  for key, per_step in seconds.items():
    record[f"{key}_ms"] = 1000 * per_step
    record[f"{key}_speedup"] = seconds["float32"] / per_step
    if key != "float32":
      record[f"{key}_max_abs_logit_diff"] = float(np.max(np.abs(logits[key] - reference)))
      record[f"{key}_top1_agreement"] = float(np.mean(
          logits[key].argmax(-1) == reference.argmax(-1)))
  emit(record)


# In the order they run by default: the headline first, the rest as the budget allows.
FIGURES = {
    "kd_step": lambda args, budget: resnet_figures(args, budget, batch_sizes=args.batch_sizes[:1]),
    "fused_loss": fused_loss_figure,
    "lm_kd_step": lm_figure,
    "teacher_forward": teacher_forward_figure,
    "vit_kd_step": vit_figure,
    "kd_step_small_batch": lambda args, budget: (
        resnet_figures(args, budget, batch_sizes=args.batch_sizes[1:]) if not args.smoke else
        emit({"figure": "kd_step", "skipped": "smoke mode: one batch size"})),
}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes, one step (a test).")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps per round.")
  parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (best kept).")
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps (compilation).")
  parser.add_argument("--budget_s", type=float, default=300.0,
                      help="Wall-clock seconds after which the remaining figures are skipped.")
  parser.add_argument("--figures", default=",".join(FIGURES),
                      help=f"Comma-separated, run in this order; valid: {', '.join(FIGURES)}.")
  parser.add_argument("--fused_chunks", default="8192x1024,131072x256",
                      help="The fused loss's chunkings to time, VOCABxTOKENS comma-separated "
                           "(the first one is 'fused'; a vocabulary chunk at least the "
                           "vocabulary is one block: one pass forward).")
  parser.add_argument("--no_torch_compile", action="store_true",
                      help="Skip the torch.compile reference (it compiles for about a minute).")
  args = parser.parse_args(argv)
  args.steps = args.steps or (1 if args.smoke else 20)
  args.rounds = args.rounds or (1 if args.smoke else 3)
  args.warmup = 1 if args.smoke else args.warmup
  args.batch_sizes = (2,) if args.smoke else (256, 64)
  for name in ("steps", "rounds", "warmup"):
    if getattr(args, name) <= 0:
      print(f"Error: --{name} must be a positive integer, got {getattr(args, name)}.",
            file=sys.stderr)
      sys.exit(2)
  try:
    chunks = [tuple(int(n) for n in c.split("x")) for c in args.fused_chunks.split(",")]
    if not chunks or any(len(c) != 2 or min(c) < 1 for c in chunks):
      raise ValueError
  except ValueError:
    print(f"Error: --fused_chunks must be VOCABxTOKENS pairs of positive integers, comma-"
          f"separated (e.g. 8192x1024,131072x256), got {args.fused_chunks!r}.", file=sys.stderr)
    sys.exit(2)
  args.fused_chunks = chunks
  args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
  unknown = [f for f in args.figures if f not in FIGURES]
  if unknown:
    print(f"Error: --figures: unknown {', '.join(unknown)}; valid: {', '.join(FIGURES)}.",
          file=sys.stderr)
    sys.exit(2)
  return args


def _versions() -> dict:
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch"):
    if importlib.util.find_spec(name) is not None:
      versions[f"{name}_version"] = getattr(importlib.import_module(name), "__version__", None)
  return versions


def main(argv=None):
  args = parse_args(argv)
  budget = Budget(args.budget_s)
  emit({"figure": "start", "smoke": args.smoke, **_device(), **_versions()})
  for name in args.figures:
    try:
      FIGURES[name](args, budget)
    except Exception as error:  # pylint: disable=broad-except
      # One broken figure must not cost the others (a GPU lease is minutes long).
      emit({"figure": name, "error": f"{type(error).__name__}: {error}"[:2000]})
      traceback.print_exc()


if __name__ == "__main__":
  main()
