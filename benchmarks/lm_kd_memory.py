"""Compiled temporary memory of the LM KD step's loss head, fused vs full logits.

    python -m benchmarks.lm_kd_memory            # [4, 2048] tokens, D 2048, V 128256, bf16
    python -m benchmarks.lm_kd_memory --tokens=2,64 --hidden=32 --vocab=512   # smoke

What is compiled: `jax.value_and_grad` of the `kd` method's loss (CE 0.5 + KD 0.5, T = 1, as
configs/lm_pretrained.py) with respect to the student's final hidden states [B, T, D] and
unembedding [D, V], the teacher's hidden states and unembedding given (bfloat16, under
stop_gradient), for `fused='off'` (the models' `[B, T, V]` logits, as TRL computes them) and
`fused='on'` (`kdjax.methods.lm_fused`). Everything before the final norm is the same in both
and left out. Inputs are abstract (`jax.ShapeDtypeStruct`): nothing is allocated or run;
`compile().memory_analysis().temp_size_in_bytes` is XLA's temporary buffer size.
"""

import argparse

import jax
import jax.numpy as jnp

from kdjax.methods import base
from kdjax.methods.logit import KD
from kdjax.models.output import Output


def loss_head(fused: str):
  config = KD.default_config()
  config.ce_weight, config.kd_weight, config.temperature, config.fused = 0.5, 0.5, 1.0, fused
  method = KD(config)

  def loss(student_hidden, student_unembedding, teacher_hidden, teacher_unembedding, labels):
    def output(hidden, unembedding):
      logits = jnp.dot(hidden, unembedding, preferred_element_type=jnp.float32)
      return Output(logits, {"hidden": hidden, "unembedding": unembedding})
    teacher = jax.lax.stop_gradient(output(teacher_hidden, teacher_unembedding))
    batch = base.Batch(student=output(student_hidden, student_unembedding), teacher=teacher,
                       labels=labels, where=jnp.ones(labels.shape, bool),
                       step=jnp.zeros((), jnp.int32))
    return method.loss({}, {}, batch, base.single_device_ops())[0]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_bytes(fused: str, batch: int, length: int, hidden: int, vocab: int, dtype) -> int:
  shapes = (jax.ShapeDtypeStruct((batch, length, hidden), dtype),
            jax.ShapeDtypeStruct((hidden, vocab), dtype),
            jax.ShapeDtypeStruct((batch, length, hidden), dtype),
            jax.ShapeDtypeStruct((hidden, vocab), dtype),
            jax.ShapeDtypeStruct((batch, length), jnp.int32))
  compiled = loss_head(fused).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", default="4,2048", help="B,T")
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  batch, length = (int(x) for x in args.tokens.split(","))
  dtype = jnp.dtype(args.dtype)
  print(f"backend {jax.default_backend()}, [{batch}, {length}] tokens, D {args.hidden}, "
        f"V {args.vocab}, {args.dtype}")
  for fused in ("off", "on"):
    size = temp_bytes(fused, batch, length, args.hidden, args.vocab, dtype)
    print(f"fused={fused}: compiled temp {size / 2**30:.2f} GiB ({size} bytes)")


if __name__ == "__main__":
  main()
