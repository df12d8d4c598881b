"""Run as a script: 3 KD train steps of a small LM pair (and a small ViT pair) under the
parallel strategy of argv[1] ('jit', 'jit_2d' or 'jit_2d_fsdp') with `config.mesh` argv[2]
('' for jit), on however many devices XLA_FLAGS gives. Prints one JSON line:
{pair: {'losses': [3 floats], 'teacher_bytes': total, 'teacher_bytes_per_device': [one per
device], 'student_bytes_per_device': [...], 'eval': {metric: sum}}}; the per-device bytes are
summed over `array.addressable_shards`. `test_model_parallel.py` compares 1 and 8 devices.
"""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import methods, models
from kdjax.methods.base import Batch
from kdjax.methods import eval_metrics
from kdjax.models.transformer import TransformerLM
from kdjax.models.vit import VisionTransformer
from kdjax.train import optimizer as optimizer_lib
from kdjax.train import parallel as parallel_lib
from kdjax.train import state as state_lib, step as step_lib

BATCH = 8
VOCAB = 259  # The byte tokenizer's: does not divide by 4, so the embedding splits on D.
LENGTH = 16


def _bytes_per_device(tree) -> list:
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return [per_device[k] for k in sorted(per_device)]


def _pair(name):
  rng = np.random.default_rng(0)
  if name == "lm":
    # Student: lm_tiny. Teacher: lm_tiny's shape, twice as wide (every width divides by 4).
    student = models.get_model("lm_tiny", num_classes=VOCAB)
    teacher = TransformerLM(vocab_size=VOCAB, num_layers=2, embed_dim=64, num_heads=4,
                            mlp_dim=128)
    tokens = rng.integers(0, VOCAB, size=(BATCH, LENGTH + 1)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[-1, LENGTH // 2:] = False  # A padded tail: masked tokens must not count.
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    return student, teacher, batch, batch["tokens"][:2]
  student = VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=12)
  teacher = VisionTransformer(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=12)
  inputs = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
  batch = {"inputs": inputs, "labels": rng.integers(0, 12, size=(BATCH,)).astype(np.int32),
           "mask": np.ones((BATCH,), bool)}
  return student, teacher, batch, inputs[:2]


def run_pair(name, parallel):
  student, teacher, host_batch, sample = _pair(name)
  student_variables = models.init_variables(student, jax.random.key(0), sample)
  teacher_variables = jax.device_get(
      models.init_variables(teacher, jax.random.key(1), sample))
  student_apply, teacher_apply = models.apply_fn(student), models.apply_fn(teacher)
  method_class = methods.get_method_class("kd")
  config = method_class.default_config()
  config.temperature = 2.0
  method = method_class(config)
  s_out, _ = student_apply(student_variables, sample, train=False)
  t_out, _ = teacher_apply(teacher_variables, sample, train=False)
  label_shape = s_out.logits.shape[:-1]
  method_params, method_state = method.init(jax.random.key(2), Batch(
      s_out, t_out, jnp.zeros(label_shape, jnp.int32), jnp.ones(label_shape, bool),
      jnp.zeros((), jnp.int32), teacher_variables=teacher_variables))
  optimizer = optimizer_lib.build_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, schedule="constant", warmup_steps=0,
      weight_decay=0.1, momentum=0.9, nesterov=False)), 100)
  state = parallel.put_state(jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=jax.random.PRNGKey(0))))
  teacher_on_device = parallel.put_teacher(teacher_variables)
  train_step = parallel.compile_train_step(step_lib.make_train_step(
      student_apply=student_apply, teacher_apply=teacher_apply, method=method,
      optimizer=optimizer, reduce_gradients=parallel.reduce_gradients))
  eval_step = parallel.compile_eval_step(step_lib.make_eval_step(
      student_apply=student_apply, teacher_apply=teacher_apply,
      metrics=tuple(eval_metrics.CLASSIFICATION_METRICS)))
  batch = parallel.put_batch(host_batch)
  losses = []
  for _ in range(3):
    state, metrics = train_step(state, teacher_on_device, batch)
    losses.append(parallel_lib.metrics_to_host(parallel, metrics)["loss"])
  sums = parallel_lib.metrics_to_host(parallel, eval_step(state, teacher_on_device, batch))
  host_state = parallel.to_host(state)
  return {
      "losses": losses,
      "eval": sums,
      "student_checksum": float(sum(np.abs(np.asarray(x, np.float64)).sum()
                                    for x in jax.tree.leaves(host_state.params["student"]))),
      "teacher_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(teacher_variables))),
      "teacher_bytes_per_device": _bytes_per_device(teacher_on_device),
      "student_bytes_per_device": _bytes_per_device(state.params["student"]),
      "student_bytes": int(sum(np.asarray(x).nbytes
                               for x in jax.tree.leaves(host_state.params["student"]))),
  }


def main():
  kind, mesh = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
  pairs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["lm", "vit"]
  parallel = parallel_lib.get_parallel(kind, mesh)
  print(json.dumps({name: run_pair(name, parallel) for name in pairs}))


if __name__ == "__main__":
  main()
