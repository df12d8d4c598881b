"""kdjax's real train step on a random batch: what the benchmark and the method x model matrix
time and check, without a dataset.

`build_synthetic_step(...)` builds the student, the teacher, the method (with its recipe
hyper-parameters when given), the optimizer and the state exactly as a run does (the same
`make_train_step`, compiled by the configured parallel strategy) and returns a `SyntheticStep`
whose `run(n)` applies `n` steps to one fixed random batch and returns the seconds taken.
"""

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np

INPUT_SHAPES = {"image32": (32, 32, 3), "image224": (224, 224, 3), "signal1d": (40,)}
TRAIN_EXAMPLES = 50_000  # CIFAR-sized memories for methods that keep one (CRD).


@dataclasses.dataclass
class SyntheticStep:
  # run(n) -> seconds for n steps (blocking on the result); run(n, batch) on another device
  # batch, e.g. `put_batch(dict(host_batch, **cached_teacher_outputs))`, or on `batch(i)` for
  # the i-th of the n steps (a data pipeline's batches).
  run: Callable[..., float]
  last_metrics: Callable[[], dict]  # The last step's metrics, on the host.
  student_params: int
  teacher_params: int
  method_params: int
  jax: Any
  host_batch: Optional[dict] = None  # The fixed random batch, on the host.
  put_batch: Optional[Callable[[dict], Any]] = None  # The parallel strategy's put_batch.


def build_synthetic_step(student_name: str, teacher_name: str, *, num_classes: int,
                         batch_size: int, method_name: str, parallel: str = "jit",
                         method_config: Optional[Any] = None, seed: int = 0,
                         learning_rate: float = 0.05,
                         calibrate_teacher: bool = False,
                         make_batch: Optional[Callable] = None,
                         steps_per_call: int = 1) -> SyntheticStep:
  """`calibrate_teacher`: set the random teacher's BatchNorm running statistics to those of
  the random batch (as a trained teacher's match its data). Untouched, an untrained teacher's
  statistics (mean 0, variance 1) make eval-mode BatchNorm the identity, and deep ResNet
  features grow by orders of magnitude, which feature losses then amplify.
  `make_batch`: the step makes its batch on the device from references
  (`kdjax.data.device_batches.DeviceBatches`); `run(n, refs(i))` then takes references.
  `steps_per_call` (with `make_batch`): one call runs that many steps (`config.steps_per_call`);
  `run(n, refs)` then makes n / steps_per_call calls, the i-th on `refs(i * steps_per_call)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kdjax import methods, models  # pylint: disable=g-import-not-at-top
  from kdjax.data import pairing  # pylint: disable=g-import-not-at-top
  from kdjax.methods.base import Batch, RunFacts  # pylint: disable=g-import-not-at-top
  from kdjax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from kdjax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  from kdjax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  from kdjax.train.run_setup import model_kwargs  # pylint: disable=g-import-not-at-top

  parallel = parallel_lib.get_parallel(parallel)
  parallel_lib.check_batch_divisible(batch_size, parallel.num_devices, "--batch_size")
  kwargs = lambda name: model_kwargs(name, parallel)
  input_shape = INPUT_SHAPES[models.registry.model_input_kind(student_name)]
  student = models.get_model(student_name, num_classes=num_classes, **kwargs(student_name))
  teacher = models.get_model(teacher_name, num_classes=num_classes, **kwargs(teacher_name))
  sample = jnp.zeros((2,) + input_shape)
  student_variables = models.init_variables(student, jax.random.key(seed), sample)
  teacher_variables = models.init_variables(teacher, jax.random.key(seed + 1), sample)
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(batch_size,) + input_shape).astype(np.float32)
  if calibrate_teacher and "batch_stats" in teacher_variables:
    plain = models.apply_fn(models.get_model(teacher_name, num_classes=num_classes))  # No pmap axis.
    calibrate = jax.jit(lambda v: {**v, **plain(v, inputs, train=True)[1]})
    for _ in range(40):  # Running averages with momentum 0.9: 0.9**40 = 1.5% of the start.
      teacher_variables = calibrate(teacher_variables)
  method_class = methods.get_method_class(method_name)
  method = method_class(method_config if method_config is not None
                        else method_class.default_config())
  method.prepare(RunFacts(num_train_examples=TRAIN_EXAMPLES, teacher_model=teacher_name,
                          train_labels=lambda: np.arange(TRAIN_EXAMPLES) % num_classes))
  student_apply, teacher_apply = models.apply_fn(student), models.apply_fn(teacher)
  s_out, _ = student_apply(student_variables, sample, train=False)
  t_out, _ = teacher_apply(teacher_variables, sample, train=False)
  method_params, method_state = method.init(jax.random.key(seed + 2), Batch(
      s_out, t_out, jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool), jnp.zeros((), jnp.int32),
      rng=jax.random.key(seed + 3), data={"index": jnp.arange(2, dtype=jnp.int32)},
      teacher_variables=teacher_variables))
  opt_config = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=learning_rate, schedule="constant", warmup_steps=0, weight_decay=5e-4,
      momentum=0.9, nesterov=False))
  optimizer = optimizer_lib.build_optimizer(opt_config, 1000)
  state = parallel.put_replicated(jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=jax.random.PRNGKey(seed))))
  teacher_on_device = parallel.put_replicated(jax.device_get(teacher_variables))
  train_step = parallel.compile_train_step(step_lib.make_train_step(
      student_apply=student_apply, teacher_apply=teacher_apply, method=method,
      optimizer=optimizer, reduce_gradients=parallel.reduce_gradients),
      **({"make_batch": make_batch} if make_batch is not None else {}),
      steps_per_call=steps_per_call)
  host_batch = {
      "inputs": inputs,
      "labels": rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32),
      "index": rng.permutation(TRAIN_EXAMPLES)[:batch_size].astype(np.int32),
      **({"partner_row": pairing.partner_rows(batch_size)}
         if method.sampler == "class_pairs" else {})}
  fixed_batch = parallel.put_batch(host_batch)
  holder = {"state": state, "metrics": None}

  def run(num_steps: int, batch=None) -> float:
    if num_steps % steps_per_call:
      raise ValueError(f"run({num_steps}) is not a whole number of calls of {steps_per_call} "
                       "steps.")
    batch = fixed_batch if batch is None else batch
    start = time.perf_counter()
    for i in range(0, num_steps, steps_per_call):
      holder["state"], holder["metrics"] = train_step(
          holder["state"], teacher_on_device, batch(i) if callable(batch) else batch)
    jax.block_until_ready((holder["state"], holder["metrics"]))
    return time.perf_counter() - start

  def last_metrics() -> dict:
    metrics = holder["metrics"]
    if steps_per_call > 1:  # Stacked over the call's steps: the last step's.
      metrics = jax.tree.map(lambda x: x[-1], metrics)
    return parallel_lib.metrics_to_host(parallel, metrics)

  return SyntheticStep(run=run, last_metrics=last_metrics,
                       student_params=models.count_params(student_variables["params"]),
                       teacher_params=models.count_params(teacher_variables["params"]),
                       method_params=models.count_params(method_params), jax=jax,
                       host_batch=host_batch, put_batch=parallel.put_batch)
