r"""MFU of the LM KD train step: kdjax (fused losses) against PyTorch (TRL-style full logits).

    python -m benchmarks.lm_mfu                   # GPU: ~1.2B Llama teacher -> ~160M student
    python -m benchmarks.lm_mfu --smoke           # CPU, tiny shapes: both steps run

One step = the teacher's forward (bfloat16 weights, under stop_gradient / no_grad), the
student's forward and backward (float32 master weights, bfloat16 compute), the loss
`0.5 * CE + 0.5 * KD(T = 1)` (configs/lm_pretrained.py's kd row) on every token, and an AdamW
update. Both models are Llama-shaped with Llama 3's vocabulary (V = 128256), sequence 2048:

  teacher  D 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, tied (Llama-3.2-1B's shape),
           1.24B parameters;
  student  D 768, 10 layers, 12 heads / 4 KV heads, MLP 2048, tied, 0.16B parameters.

kdjax: `kdjax.models.pretrained` Flax modules and the `kd` method with `fused='on'`
(`kdjax.methods.lm_fused`: divergence and CE computed vocabulary-chunked from the hidden states,
no [B, T, V] array). PyTorch: `transformers.LlamaForCausalLM` (sdpa attention) under
`torch.autocast(bfloat16)`, the teacher's and the student's full logits, `log_softmax`, KL and
CE as TRL's GKDTrainer computes them (`generalized_jsd_loss` with beta = 0 is the forward KL),
`torch.optim.AdamW(fused=True)` on GPU.

FLOPs, counted analytically (PaLM, Chowdhery et al. 2022, appendix B), per token:
  student train  6 N_s + 12 L_s D_s T
  teacher fwd    2 N_t +  4 L_t D_t T
where N is the number of parameters taking part in matrix products (every weight matrix and
the unembedding D x V; the embedding lookup and the norms excluded; a tied embedding counted
once, as the unembedding) and the attention term counts QK^T and AV for all T keys (causal
masking not discounted, as PaLM does). The loss head's own FLOPs (the fused path recomputes
logits in its backward) are not counted: the figure is model FLOPs utilisation, the same
numerator for both frameworks. MFU = tokens/s * FLOPs per token / the chip's dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s).

Prints one JSON line per framework and a last line comparing them.
"""

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable, Dict

import numpy as np

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclasses.dataclass(frozen=True)
class Shape:
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class Sizes:
  vocab: int
  length: int
  batch: int
  teacher: Shape
  student: Shape


FULL = Sizes(vocab=128256, length=2048, batch=4,
             teacher=Shape(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192),
             student=Shape(hidden=768, layers=10, heads=12, kv_heads=4, mlp=2048))
SMOKE = Sizes(vocab=512, length=32, batch=2,
              teacher=Shape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128),
              student=Shape(hidden=32, layers=1, heads=4, kv_heads=2, mlp=64))


def matmul_params(shape: Shape, vocab: int) -> int:
  """N: parameters in matrix products (module docstring), one Llama layer stack + unembedding."""
  attention = shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
  mlp = 3 * shape.hidden * shape.mlp
  return shape.layers * (attention + mlp) + shape.hidden * vocab


def flops_per_token(sizes: Sizes) -> Dict[str, float]:
  s, t, length = sizes.student, sizes.teacher, sizes.length
  student = 6 * matmul_params(s, sizes.vocab) + 12 * s.layers * s.hidden * length
  teacher = 2 * matmul_params(t, sizes.vocab) + 4 * t.layers * t.hidden * length
  return {"student_train": float(student), "teacher_forward": float(teacher),
          "total": float(student + teacher)}


def _timed(step: Callable[[], object], sync: Callable[[object], None], *, warmup: int,
           steps: int, rounds: int) -> float:
  """Seconds per step, the best of `rounds` rounds of `steps` steps after `warmup` steps."""
  for _ in range(warmup):
    sync(step())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(steps):
      out = step()
    sync(out)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def _pretrained_config(shape: Shape, sizes: Sizes):
  from kdjax.models.pretrained import PretrainedConfig  # pylint: disable=g-import-not-at-top
  return PretrainedConfig(
      model_type="llama", vocab_size=sizes.vocab, hidden_size=shape.hidden,
      intermediate_size=shape.mlp, num_layers=shape.layers, num_heads=shape.heads,
      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
      max_position_embeddings=sizes.length, norm_eps=1e-5, activation="silu",
      tie_embeddings=True, rope_theta=500000.0, layer_types=("full",) * shape.layers)


def jax_step(sizes: Sizes, args) -> Dict[str, object]:
  """The kdjax step: pretrained-family modules, `kd` with fused='on', AdamW."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kdjax.methods import base  # pylint: disable=g-import-not-at-top
  from kdjax.methods.logit import KD  # pylint: disable=g-import-not-at-top
  from kdjax.models.pretrained import build_module  # pylint: disable=g-import-not-at-top

  student = build_module(_pretrained_config(sizes.student, sizes), jnp.bfloat16)
  teacher = build_module(_pretrained_config(sizes.teacher, sizes), jnp.bfloat16)
  sample = jnp.zeros((1, sizes.length), jnp.int32)
  student_params = jax.jit(student.init)(jax.random.key(0), sample)["params"]
  teacher_params = jax.jit(lambda: jax.tree.map(
      lambda x: x.astype(jnp.bfloat16), teacher.init(jax.random.key(1), sample)))()["params"]
  config = KD.default_config()
  config.ce_weight, config.kd_weight, config.temperature, config.fused = 0.5, 0.5, 1.0, "on"
  method = KD(config)
  optimizer = optax.adamw(1e-5)
  ops = base.single_device_ops()
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, sizes.vocab, (sizes.batch, sizes.length + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  where = jnp.ones(inputs.shape, bool)

  def step(carry, teacher_params):
    params, opt_state = carry
    teacher_output = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, inputs))

    def loss_fn(params):
      output = student.apply({"params": params}, inputs)
      batch = base.Batch(student=output, teacher=teacher_output, labels=targets, where=where,
                         step=jnp.zeros((), jnp.int32))
      return method.loss({}, {}, batch, ops)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  compiled = jax.jit(step, donate_argnums=(0,)).lower(
      (student_params, optimizer.init(student_params)), teacher_params).compile()
  memory = compiled.memory_analysis()
  holder = {"carry": (student_params, optimizer.init(student_params))}

  def one():
    holder["carry"], loss = compiled(holder["carry"], teacher_params)
    return loss

  seconds = _timed(one, jax.block_until_ready, warmup=args.warmup, steps=args.steps,
                   rounds=args.rounds)
  device = jax.devices()[0]
  return {"framework": "jax", "step_s": seconds, "loss": float(one()),
          "device_kind": device.device_kind, "backend": jax.default_backend(),
          "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "jax": jax.__version__}


def torch_step(sizes: Sizes, args) -> Dict[str, object]:
  """The PyTorch step, TRL-style: full logits of both models, log_softmax, KL and CE."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)

  def model(shape: Shape, dtype):
    config = transformers.LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=sizes.length, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=True, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)

  student = model(sizes.student, torch.float32).train()
  teacher = model(sizes.teacher, torch.bfloat16).eval().requires_grad_(False)
  optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device == "cuda")
  tokens = torch.as_tensor(np.random.default_rng(0).integers(
      0, sizes.vocab, (sizes.batch, sizes.length + 1)), device=device)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def one():
    with torch.no_grad():
      teacher_logits = teacher(inputs).logits
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      student_logits = student(inputs).logits
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
    kd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none",
                  log_target=True).sum(-1).mean()
    ce = F.nll_loss(student_log_probs.flatten(0, 1), targets.flatten())
    loss = 0.5 * ce + 0.5 * kd
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def sync(loss):
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss)

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  seconds = _timed(one, sync, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
  return {"framework": "torch", "step_s": seconds, "loss": sync(one()),
          "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
          "torch": torch.__version__, "transformers": transformers.__version__}


def figures(record: Dict[str, object], sizes: Sizes) -> Dict[str, object]:
  flops = flops_per_token(sizes)
  tokens_per_s = sizes.batch * sizes.length / record["step_s"]
  peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in str(record["device_kind"])), None)
  return dict(record, tokens_per_s=tokens_per_s, flops_per_token=flops["total"],
              model_tflops_per_s=tokens_per_s * flops["total"] / 1e12,
              mfu=tokens_per_s * flops["total"] / peak if peak else None, peak_flops=peak,
              batch=sizes.batch, length=sizes.length, vocab=sizes.vocab)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
  parser.add_argument("--batch", type=int, default=None, help="sequences per step")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--frameworks", default="jax,torch")
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else FULL
  if args.batch:
    sizes = dataclasses.replace(sizes, batch=args.batch)
  if args.smoke:
    args.warmup, args.steps, args.rounds = 1, 1, 1
  print(json.dumps({"sizes": dataclasses.asdict(sizes),
                    "student_matmul_params": matmul_params(sizes.student, sizes.vocab),
                    "teacher_matmul_params": matmul_params(sizes.teacher, sizes.vocab),
                    "flops_per_token": flops_per_token(sizes)}), flush=True)
  results = {}
  runners = {"jax": jax_step, "torch": torch_step}
  for name in args.frameworks.split(","):
    try:
      results[name] = figures(runners[name](sizes, args), sizes)
    except Exception as error:  # pylint: disable=broad-except
      # An out-of-memory full-logits step is a result too; report it and go on.
      results[name] = {"framework": name, "error": f"{type(error).__name__}: {error}"[:500]}
    print(json.dumps(results[name]), flush=True)
  if all("step_s" in results.get(n, {}) for n in ("jax", "torch")):
    print(json.dumps({"jax_speedup_over_torch":
                      results["torch"]["step_s"] / results["jax"]["step_s"]}), flush=True)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
