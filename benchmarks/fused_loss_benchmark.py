"""Fused (vocabulary-chunked) vs unfused LM distillation JSD: time and memory.

    python -m benchmarks.fused_loss_benchmark --repeats 3

Part 1, run: `[batch, seq, vocab]` logits from hidden size `--hidden` (defaults
`[8, 512, 32000]`, hidden 512, float32), the loss averaged over tokens, for

- `fused`: `kdjax.losses.fused_generalized_jsd` on (hidden, unembedding);
- `unfused`: `kdjax.losses.generalized_jsd` on `hidden @ unembedding`;
- `trl_torch`: TRL's `GKDTrainer.generalized_jsd_loss` (beta 0.5, temperature
  1, reduction `batchmean`) re-stated in PyTorch on `hidden @ unembedding`
  (CPU; needs `pip install torch==2.13.0`).

each as `value` and `value+grad` (w.r.t. the student hidden states and
unembedding), interleaved, best of `--repeats`. Memory: for the JAX programs
XLA's `memory_analysis()` of the compiled program (temp + arguments + outputs);
for every variant the peak RSS growth of a fresh subprocess over its RSS once
the inputs exist (`ru_maxrss`, includes compilation scratch for JAX).

Part 2, compile only: `[4, 2048, 128256]`, hidden 2048, bfloat16 inputs, the
compiled `memory_analysis()` of fused vs unfused value+grad (the unfused one is
never run), against the goal `1.5 x base`, `base = one [token_chunk,
vocab_chunk] float32 logits block for student and teacher + the bfloat16
unembedding gradient + both bfloat16 hidden states` (temp memory only: the
inputs are arguments and the gradients outputs). Prints markdown tables and a
last JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses

MB = 1e6
BETA = 0.5


def _jax_losses(vocab_chunk: int, token_chunk: int) -> Dict[str, Callable]:
  def fused(hs, ws, ht, wt):
    return jnp.mean(losses.fused_generalized_jsd(
        hs, ws, ht, wt, beta=BETA, vocab_chunk_size=vocab_chunk,
        token_chunk_size=token_chunk))

  def unfused(hs, ws, ht, wt):
    return jnp.mean(losses.generalized_jsd(
        jnp.dot(hs, ws, preferred_element_type=jnp.float32),
        jnp.dot(ht, wt, preferred_element_type=jnp.float32), beta=BETA))

  return {"fused": fused, "unfused": unfused}


def _jax_program(fn: Callable, mode: str) -> Callable:
  if mode == "value":
    return jax.jit(fn)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def trl_generalized_jsd_loss(student_logits, teacher_logits, beta=0.5,
                             temperature=1.0):
  """TRL GKDTrainer.generalized_jsd_loss (labels=None, reduction='batchmean').

  `sum(jsd) / (B * T)` for `[B, T, V]` logits; TRL's mixture is
  `logsumexp([log p_s + log(1 - beta), log p_t + log beta])` and its
  `F.kl_div(input, target, log_target=True)` is `KL(target || input)`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
  beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
  mixture_log_probs = torch.logsumexp(torch.stack([
      student_log_probs + torch.log(1 - beta_t),
      teacher_log_probs + torch.log(beta_t)]), dim=0)
  kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs,
                        reduction="none", log_target=True)
  kl_student = F.kl_div(mixture_log_probs, student_log_probs,
                        reduction="none", log_target=True)
  jsd = beta * kl_teacher + (1 - beta) * kl_student
  return jsd.sum() / (jsd.size(0) * jsd.size(1))


def _inputs(batch, seq, hidden, vocab, dtype=np.float32):
  rng = np.random.default_rng(0)
  return [rng.normal(size=(batch, seq, hidden)).astype(dtype),
          (rng.normal(size=(hidden, vocab)) / np.sqrt(hidden) * 3).astype(dtype),
          rng.normal(size=(batch, seq, hidden)).astype(dtype),
          (rng.normal(size=(hidden, vocab)) / np.sqrt(hidden) * 3).astype(dtype)]


def _torch_step(arrays, mode):
  import torch  # pylint: disable=g-import-not-at-top
  hs, ws, ht, wt = [torch.from_numpy(a) for a in arrays]

  def step():
    if mode == "value":
      with torch.no_grad():
        return float(trl_generalized_jsd_loss(hs @ ws, ht @ wt, beta=BETA))
    a = hs.clone().requires_grad_()
    b = ws.clone().requires_grad_()
    loss = trl_generalized_jsd_loss(a @ b, ht @ wt, beta=BETA)
    loss.backward()
    return float(loss.detach())  # float() of a grad-requiring tensor warns.
  return step


def _jax_step(arrays, name, mode, args):
  fn = _jax_losses(args.vocab_chunk, args.token_chunk)[name]
  program = _jax_program(fn, mode)
  device_arrays = [jnp.asarray(a) for a in arrays]
  compiled = program.lower(*device_arrays).compile()

  def step():
    out = jax.block_until_ready(compiled(*device_arrays))
    return float(out if mode == "value" else out[0])
  return step, compiled


def _memory(compiled) -> Dict[str, float]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {"temp_mb": stats.temp_size_in_bytes / MB,
          "argument_mb": stats.argument_size_in_bytes / MB,
          "output_mb": stats.output_size_in_bytes / MB}


def _peak_rss_child(args) -> None:
  """In a fresh process: RSS growth of one variant over its inputs' RSS."""
  arrays = _inputs(args.batch, args.seq, args.hidden, args.vocab)
  name, mode = args.peak_rss
  if name == "trl_torch":
    step = _torch_step(arrays, mode)
  else:
    step, _ = _jax_step(arrays, name, mode, args)
  before = _peak_rss_bytes()
  step()
  step()
  print(json.dumps({"peak_rss_growth_mb": (_peak_rss_bytes() - before) / MB}))


def _peak_rss_bytes() -> int:
  """This process's peak RSS. Linux's `ru_maxrss` is inherited across exec (a child of a
  5 GB parent starts at 5 GB and shows no growth); `VmHWM` belongs to the new address space."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss(name, mode, args) -> float:
  command = [sys.executable, "-m", "benchmarks.fused_loss_benchmark",
             "--batch", str(args.batch), "--seq", str(args.seq),
             "--hidden", str(args.hidden), "--vocab", str(args.vocab),
             "--vocab_chunk", str(args.vocab_chunk),
             "--token_chunk", str(args.token_chunk),
             "--peak_rss", name, mode]
  out = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mb"]


def run_small(args) -> Dict[str, Any]:
  arrays = _inputs(args.batch, args.seq, args.hidden, args.vocab)
  variants = {}
  for mode in ("value", "value+grad"):
    for name in ("fused", "unfused"):
      step, compiled = _jax_step(arrays, name, mode, args)
      variants[(name, mode)] = (step, _memory(compiled))
    if not args.skip_torch:
      variants[("trl_torch", mode)] = (_torch_step(arrays, mode), {})
  times = {key: [] for key in variants}
  values = {key: step() for key, (step, _) in variants.items()}  # warm-up
  for _ in range(args.repeats):  # interleaved: load swings hit all alike
    for key, (step, _) in variants.items():
      start = time.perf_counter()
      step()
      times[key].append(time.perf_counter() - start)
  rows = []
  for (name, mode), (_, memory) in variants.items():
    row = {"variant": name, "mode": mode, "best_ms": 1e3 * min(times[name, mode]),
           "value": values[name, mode], **memory}
    if not args.skip_rss:
      row["peak_rss_growth_mb"] = _peak_rss(name, mode, args)
    rows.append(row)
  for row in rows:
    base = next(r for r in rows if r["variant"] == "fused"
                and r["mode"] == row["mode"])
    row["time_vs_fused"] = row["best_ms"] / base["best_ms"]
  return {"shape": [args.batch, args.seq, args.vocab], "hidden": args.hidden,
          "rows": rows}


def run_large(args) -> Dict[str, Any]:
  batch, seq, hidden, vocab = 4, 2048, 2048, 128256
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (
      (batch, seq, hidden), (hidden, vocab), (batch, seq, hidden),
      (hidden, vocab))]
  out = {"shape": [batch, seq, vocab], "hidden": hidden, "dtype": "bfloat16",
         "vocab_chunk": args.vocab_chunk, "token_chunk": args.token_chunk}
  for name, fn in _jax_losses(args.vocab_chunk, args.token_chunk).items():
    compiled = _jax_program(fn, "value+grad").lower(*shapes).compile()
    out[name] = _memory(compiled)
  chunk_logits = 2 * args.token_chunk * args.vocab_chunk * 4
  unembed_grad = hidden * vocab * 2
  hidden_states = 2 * batch * seq * hidden * 2
  out["base_mb"] = (chunk_logits + unembed_grad + hidden_states) / MB
  out["goal_mb"] = 1.5 * out["base_mb"]
  out["unembeddings_mb"] = 2 * hidden * vocab * 2 / MB
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--vocab_chunk", type=int, default=8192)
  parser.add_argument("--token_chunk", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--skip_rss", action="store_true")
  parser.add_argument("--skip_large", action="store_true")
  parser.add_argument("--peak_rss", nargs=2, metavar=("VARIANT", "MODE"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.peak_rss:
    _peak_rss_child(args)
    return

  print(f"backend={jax.default_backend()} vocab_chunk={args.vocab_chunk} "
        f"token_chunk={args.token_chunk} repeats={args.repeats}", flush=True)
  small = run_small(args)
  print(f"\n[{args.batch}, {args.seq}, {args.vocab}] hidden {args.hidden}, "
        f"float32, generalized JSD beta={BETA}")
  print("| variant | mode | best ms | time / fused | XLA temp MB | "
        "XLA args+out MB | peak RSS growth MB | value |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in small["rows"]:
    temp = f"{r['temp_mb']:.0f}" if "temp_mb" in r else "-"
    io = (f"{r['argument_mb'] + r['output_mb']:.0f}" if "argument_mb" in r
          else "-")
    rss = (f"{r['peak_rss_growth_mb']:.0f}" if "peak_rss_growth_mb" in r
           else "-")
    print(f"| {r['variant']} | {r['mode']} | {r['best_ms']:.0f} | "
          f"{r['time_vs_fused']:.2f}x | {temp} | {io} | {rss} | "
          f"{r['value']:.6f} |")
  result = {"benchmark": "fused_generalized_jsd", "small": small}
  if not args.skip_large:
    large = run_large(args)
    result["large"] = large
    print(f"\n[4, 2048, 128256] hidden 2048 bfloat16, value+grad, compile "
          f"only; goal 1.5 x (2 x {args.token_chunk} x {args.vocab_chunk} "
          f"float32 logits + 2048 x 128256 bfloat16 unembedding gradient + "
          f"2 x [8192, 2048] bfloat16 hidden states) = 1.5 x "
          f"{large['base_mb']:.0f} = {large['goal_mb']:.0f} MB (+ the two "
          f"unembeddings, {large['unembeddings_mb']:.0f} MB, as arguments)")
    print("| variant | temp MB | temp / base | argument MB | output MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("fused", "unfused"):
      m = large[name]
      print(f"| {name} | {m['temp_mb']:.0f} | "
            f"{m['temp_mb'] / large['base_mb']:.2f}x | "
            f"{m['argument_mb']:.0f} | {m['output_mb']:.0f} |")
  print()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
