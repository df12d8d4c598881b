"""Times and sizes jitted forward+backward passes of every kdjax logit loss.

    python -m benchmarks.loss_benchmark --batch 8 --seq 512 --vocab 32000 \
        --repeats 3

For each loss: `jax.jit(jax.value_and_grad(mean loss))` with respect to the
student logits, on bf16 `[batch, seq, vocab]` logits, on the default backend.
After one warm-up call it reports the best and median wall time of `repeats`
calls (each `block_until_ready`), and the compiled program's memory from
`jax.jit(...).lower(...).compile().memory_analysis()`: `temp` is XLA's scratch
memory (the intermediates), `peak` = arguments + outputs + temp - aliased.
`temp / logits` compares temp to one bf16 logits tensor. Token-chunked variants
(`kdjax.losses.chunked`) are measured too. Prints a markdown table and, last, a
single JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp

from kdjax import losses

MB = 1e6


def _loss_table(chunk_size: int) -> Dict[str, Any]:
  """name -> (loss of (student, extras...), names of the extra inputs)."""
  std = losses.standardize_logits
  chunk = {"chunk_size": chunk_size}
  return {
      "kd": (lambda s, t: losses.kd(s, t), ("teacher",)),
      "forward_kl": (lambda s, t: losses.forward_kl(s, t), ("teacher",)),
      "reverse_kl": (lambda s, t: losses.reverse_kl(s, t), ("teacher",)),
      "generalized_jsd": (lambda s, t: losses.generalized_jsd(s, t),
                          ("teacher",)),
      "skew_forward_kl": (lambda s, t: losses.skew_forward_kl(s, t),
                          ("teacher",)),
      "skew_reverse_kl": (lambda s, t: losses.skew_reverse_kl(s, t),
                          ("teacher",)),
      "total_variation": (lambda s, t: losses.total_variation(s, t),
                          ("teacher",)),
      "dkd": (lambda s, t, y: losses.dkd(s, t, y), ("teacher", "labels")),
      "kd(standardize_logits)": (lambda s, t: losses.kd(std(s), std(t)),
                                 ("teacher",)),
      "nkd": (lambda s, t, y: losses.nkd(s, t, y), ("teacher", "labels")),
      "taid": (lambda s, t: losses.taid(s, t, t=0.5), ("teacher",)),
      "sparse_kd(k=64)": (lambda s, v, i: losses.sparse_kd(s, v, i),
                          ("topk_values", "topk_indices")),
      "multi_teacher_kd(N=2)": (lambda s, ts: losses.multi_teacher_kd(s, ts),
                                ("teachers",)),
      "dist": (lambda s, t: losses.dist(s, t), ("teacher",)),
      "chunked_kd": (lambda s, t: losses.chunked_kd(s, t, **chunk),
                     ("teacher",)),
      "chunked_forward_kl": (
          lambda s, t: losses.chunked_forward_kl(s, t, **chunk), ("teacher",)),
      "chunked(reverse_kl)": (
          lambda s, t: losses.chunked(losses.reverse_kl, **chunk)(s, t),
          ("teacher",)),
      "chunked(generalized_jsd)": (
          lambda s, t: losses.chunked(losses.generalized_jsd, **chunk)(s, t),
          ("teacher",)),
      "chunked(dkd)": (
          lambda s, t, y: losses.chunked(losses.dkd, **chunk)(s, t, y),
          ("teacher", "labels")),
  }


def _inputs(batch: int, seq: int, vocab: int) -> Dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, seq, vocab)
  student = (3 * jax.random.normal(keys[0], shape)).astype(jnp.bfloat16)
  teacher = (3 * jax.random.normal(keys[1], shape)).astype(jnp.bfloat16)
  topk_values, topk_indices = jax.lax.top_k(teacher, 64)
  second = (3 * jax.random.normal(keys[2], shape)).astype(jnp.bfloat16)
  return {
      "student": student,
      "teacher": teacher,
      "labels": jax.random.randint(keys[3], shape[:-1], 0, vocab, jnp.int32),
      "topk_values": topk_values,
      "topk_indices": topk_indices.astype(jnp.int32),
      "teachers": jnp.stack([teacher, second]),
  }


def _memory(compiled) -> Dict[str, float]:
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"note": f"memory_analysis unavailable: {e!r}"}
  if stats is None:
    return {"note": "memory_analysis returned None on this backend"}
  temp = stats.temp_size_in_bytes
  args = stats.argument_size_in_bytes
  out = stats.output_size_in_bytes
  alias = stats.alias_size_in_bytes
  return {"temp_mb": temp / MB, "argument_mb": args / MB,
          "output_mb": out / MB, "peak_mb": (args + out + temp - alias) / MB}


def benchmark(name: str, loss: Callable, extras: List[jax.Array],
              student: jax.Array, repeats: int) -> Dict[str, Any]:
  def mean_loss(s, *rest):
    return jnp.mean(loss(s, *rest))

  step = jax.jit(jax.value_and_grad(mean_loss))
  start = time.perf_counter()
  compiled = step.lower(student, *extras).compile()
  compile_s = time.perf_counter() - start
  result = {"loss": name, "compile_s": compile_s, **_memory(compiled)}
  value, grad = compiled(student, *extras)  # warm-up
  jax.block_until_ready((value, grad))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(student, *extras))
    times.append((time.perf_counter() - start) * 1e3)
  result.update(best_ms=min(times), median_ms=statistics.median(times),
                value=float(value),
                grad_finite=bool(jnp.isfinite(grad.astype(jnp.float32)).all()))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--chunk_size", "--chunk-size", type=int, default=1024)
  parser.add_argument("--losses", default="",
                      help="comma-separated subset of loss names")
  args = parser.parse_args()

  table = _loss_table(args.chunk_size)
  names = [n for n in args.losses.split(",") if n] or list(table)
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise SystemExit(f"--losses: unknown {unknown}; known: {sorted(table)}")
  inputs = _inputs(args.batch, args.seq, args.vocab)
  logits_mb = inputs["student"].nbytes / MB
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"logits=[{args.batch}, {args.seq}, {args.vocab}] bf16 "
        f"({logits_mb:.0f} MB each), repeats={args.repeats}, "
        f"chunk_size={args.chunk_size}", flush=True)

  results = []
  for name in names:
    loss, extra_names = table[name]
    extras = [inputs[n] for n in extra_names]
    result = benchmark(name, loss, extras, inputs["student"], args.repeats)
    results.append(result)
    print(json.dumps(result), flush=True)

  print()
  print("| loss | best ms | median ms | compile s | temp MB | temp / logits "
        "| peak MB |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in results:
    temp = r.get("temp_mb")
    temp_cell = f"{temp:.0f}" if temp is not None else r.get("note", "n/a")
    ratio = f"{temp / logits_mb:.1f}x" if temp is not None else "n/a"
    peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "n/a"
    print(f"| {r['loss']} | {r['best_ms']:.0f} | {r['median_ms']:.0f} | "
          f"{r['compile_s']:.1f} | {temp_cell} | {ratio} | {peak} |")
  print()
  print(json.dumps({
      "benchmark": "kdjax.losses",
      "backend": jax.default_backend(),
      "shape": [args.batch, args.seq, args.vocab],
      "dtype": "bfloat16",
      "repeats": args.repeats,
      "chunk_size": args.chunk_size,
      "logits_mb": logits_mb,
      "results": results,
  }))


if __name__ == "__main__":
  main()
