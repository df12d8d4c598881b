r"""Does the input pipeline keep up with the train step? One invocation, one JSON line per figure.

    python -m benchmarks.pipeline_benchmark [--rounds=3] [--quick]

1. The pipeline alone (`InputPipeline.train_batch` on the calling thread, i.e. one host core):
   - CIFAR-style: uint8 32x32 records, gathered, random crop (pad 4) + flip, normalised;
   - ImageNet-style: JPEG records (synthetic, made with pillow, ~500x375) decoded as a TFDS data
     source decodes them, then inception crop 224 + flip, normalised.
   Both use the real `InputPipeline` over an in-memory stand-in for the TFDS source (no
   dataset on disk is needed); figures are examples per second per host core.
2. The train loop against the step: examples/s of the loop's data path (`train_batch` ->
   `put_batch` -> step), with `config.prefetch` = 0 and = 2 (`kdjax.data.prefetch`), over the
   examples/s of the same jitted KD step on one pre-made device batch, for the quickstart
   (mlp <- cnn1d on MNIST-1D, batch 128, the real dataset) and resnet8x4 <- resnet32x4 (batch
   32, CIFAR-style records). The goal is a ratio >= 0.95 with prefetching. Also reported: the
   step on distinct pre-made device batches (`step_distinct_batches_examples_per_sec`), the
   most any pipeline could reach, and the prefetching loop's ratio to it; and the loop with
   `config.device_batches` (`kdjax.data.device_batches`: the step makes its batch from the
   dataset held on the device; the host passes the step number), `ratio_device_batches`, and
   with `config.steps_per_call` = `--steps_per_call` as well (one call runs that many steps,
   a `lax.scan`): `ratio_device_batches_per_call` against the one-step step above, and
   `ratio_device_batches_per_call_vs_fixed_refs` against the same K-step program on batch
   references made once (the loop's own overhead).
Runs are interleaved over `--rounds` and the best of each is kept (the machine is shared).
"""

import io
import json
import time
from unittest import mock

from absl import flags, logging

from experiments import cli

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds; the best is reported.")
_QUICK = flags.DEFINE_bool("quick", False, "Few steps and images (a smoke test).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where MNIST-1D is (generated if missing).")
_LOOPS = flags.DEFINE_list("loops", ["quickstart", "resnet8x4"],
                           "Which loop-vs-step runs: quickstart (needs MNIST-1D), resnet8x4.")
_RESNET_BATCH_SIZES = flags.DEFINE_list("resnet_batch_sizes", ["32"],
                                        "Global batch sizes of the resnet8x4 loop-vs-step run.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Prefetch worker threads of the loop runs.")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", 10, "Steps a call of the device-batch loop with config.steps_per_call; "
    "divides the loop's steps (200 for the quickstart, 15 for resnet8x4, --quick: 5 and 2) "
    "or is rounded down to a divisor.")
_SYNTHETIC_MNIST1D = flags.DEFINE_bool(
    "synthetic_mnist1d", False,
    "The quickstart loop reads random signals of MNIST-1D's shapes (4000 x 40, 10 classes) "
    "instead of MNIST-1D (where TFDS or the mnist1d package is missing: the GPU image).")
_VALID_LOOPS = ("quickstart", "resnet8x4")


class _MemorySource:
  """A random-access source like `tfds.data_source`'s: `__getitems__` returns dict records;
  `decode` turns a stored value into the array TFDS would return (JPEG decoding)."""

  def __init__(self, records, decode=None):
    self.records, self.decode = records, decode

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.__getitems__([i])[0]

  def __getitems__(self, indices):
    out = []
    for i in indices:
      record = dict(self.records[i])
      if self.decode is not None:
        record["image"] = self.decode(record["image"])
      out.append(record)
    return out


def _cifar_source(num_examples: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_examples, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 100, size=num_examples)
  return _MemorySource([{"image": images[i], "label": labels[i]} for i in range(num_examples)])


def _mnist1d_like_source(num_examples: int, seed: int = 0):
  """Random float32 signals of length 40 and labels 0..9: MNIST-1D's shapes and dtypes (the
  loop's speed does not depend on the values)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  signals = rng.normal(size=(num_examples, 40)).astype(np.float32)
  labels = rng.integers(0, 10, size=num_examples)
  return _MemorySource([{"signal": signals[i], "label": labels[i]}
                        for i in range(num_examples)])


def _jpeg_source(num_examples: int, seed: int = 0):
  """JPEGs of smooth random images (so they compress like photos, ~30-60 kB), 500x375 and
  375x500 alternately, quality 90; decoded to uint8 [H, W, 3] on read, as TFDS's Image."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num_examples):
    small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    size = (500, 375) if i % 2 == 0 else (375, 500)
    image = Image.fromarray(small).resize(size, Image.BICUBIC)
    noise = rng.integers(-12, 13, size=image.size[::-1] + (3,))
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    records.append({"image": buffer.getvalue(), "label": int(rng.integers(0, 1000))})

  def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

  return _MemorySource(records, decode)


def _pipeline(dataset: str, source, *, batch_size: int):
  """The real InputPipeline with `source` standing in for the TFDS splits."""
  from kdjax.data import pipeline as pipeline_lib, sources  # pylint: disable=g-import-not-at-top
  with mock.patch.object(sources, "load_split", lambda spec, split, data_dir=None: source):
    return pipeline_lib.InputPipeline(dataset, global_batch_size=batch_size, seed=0)


def _emit(record: dict):
  print(json.dumps(record), flush=True)


def _pipeline_alone(name: str, pipeline, steps: int, rounds: int):
  best = float("inf")
  pipeline.train_batch(0)  # Warm caches (PIL, numpy) before timing.
  for r in range(rounds):
    start = time.perf_counter()
    for step in range(steps):
      pipeline.train_batch(1 + r * steps + step)
    best = min(best, time.perf_counter() - start)
  _emit({"figure": "pipeline_alone", "pipeline": name,
         "examples_per_sec_per_core": pipeline.global_batch_size * steps / best,
         "batch_size": pipeline.global_batch_size, "steps": steps})


def _divisor_at_most(n: int, k: int) -> int:
  return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def _loop_vs_step(name: str, student: str, teacher: str, pipeline, *, steps: int,
                  rounds: int, workers: int = 1, steps_per_call: int = 1):
  from benchmarks.synthetic_step import build_synthetic_step  # pylint: disable=g-import-not-at-top
  from kdjax.data.device_batches import DeviceBatches  # pylint: disable=g-import-not-at-top
  from kdjax.data.prefetch import Prefetcher  # pylint: disable=g-import-not-at-top
  from kdjax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  shapes = dict(num_classes=pipeline.spec.num_classes, batch_size=pipeline.global_batch_size,
                method_name="kd")
  step = build_synthetic_step(student, teacher, **shapes)
  step.run(2)  # Compile.
  # The same step making its batch on the device (`config.device_batches`).
  on_device = DeviceBatches(pipeline, put=parallel_lib.JitParallel().put_replicated,
                            num_steps=1000 + (4 * rounds + 4) * steps,  # All the loops' steps.
                            steps_per_call=steps_per_call)
  device_step = build_synthetic_step(student, teacher, make_batch=on_device.make_batch, **shapes)
  # And running `per_call` steps a call (`config.steps_per_call`).
  per_call = _divisor_at_most(steps, steps_per_call)
  multi_step = build_synthetic_step(student, teacher, make_batch=on_device.make_batch,
                                    steps_per_call=per_call, **shapes)
  first = [1000]  # Fresh steps each round: the loop never reuses a batch.

  def loop(depth: int) -> float:
    start_step = first[0]
    first[0] += steps
    with Prefetcher(pipeline.train_batch, put=step.put_batch, start=start_step,
                    stop=start_step + steps, depth=depth, workers=workers) as batches:
      return step.run(steps, lambda i: batches.get(start_step + i))

  def device_loop(program=device_step, call_steps: int = 1) -> float:
    """`program` (device_step, or multi_step with its `per_call`) on fresh references."""
    start_step = first[0]
    first[0] += steps
    return program.run(steps, lambda i: on_device.get(start_step + i, call_steps))

  loop(2)  # The device-batch layout compiles once more (a fresh array each step).
  device_loop()  # Compile.
  device_loop(multi_step, per_call)
  # The step on `steps` distinct batches already on the device: what a perfect pipeline could
  # give (a fresh input array each step costs the step itself a little, ~10% on a busy CPU).
  device_batches = [step.put_batch(pipeline.train_batch(s)) for s in range(steps)]
  # The device-batch step with its references made once: the cost of making the batch in the
  # step, without the loop's per-step host work (references, the step number's transfer).
  fixed_refs = on_device.get(first[0])
  fixed_refs_per_call = on_device.get(first[0], per_call)
  times = {"step_only": [], "step_distinct": [], "prefetch_0": [], "prefetch_2": [],
           "device_batches": [], "device_step_fixed_refs": [], "device_batches_per_call": [],
           "device_steps_per_call_fixed_refs": []}
  for _ in range(rounds):
    times["step_only"].append(step.run(steps))
    times["step_distinct"].append(step.run(steps, lambda i: device_batches[i]))
    times["prefetch_0"].append(loop(0))
    times["prefetch_2"].append(loop(2))
    times["device_batches"].append(device_loop())
    times["device_step_fixed_refs"].append(device_step.run(steps, lambda i: fixed_refs))
    times["device_batches_per_call"].append(device_loop(multi_step, per_call))
    times["device_steps_per_call_fixed_refs"].append(
        multi_step.run(steps, lambda i: fixed_refs_per_call))
  per_sec = {k: pipeline.global_batch_size * steps / min(v) for k, v in times.items()}
  _emit({"figure": "loop_vs_step", "run": name, "batch_size": pipeline.global_batch_size,
         "steps": steps, "step_only_examples_per_sec": per_sec["step_only"],
         "loop_examples_per_sec_prefetch_0": per_sec["prefetch_0"],
         "loop_examples_per_sec_prefetch_2": per_sec["prefetch_2"],
         "loop_examples_per_sec_device_batches": per_sec["device_batches"],
         "ratio_prefetch_0": per_sec["prefetch_0"] / per_sec["step_only"],
         "ratio_prefetch_2": per_sec["prefetch_2"] / per_sec["step_only"],
         "ratio_device_batches": per_sec["device_batches"] / per_sec["step_only"],
         "step_distinct_batches_examples_per_sec": per_sec["step_distinct"],
         "ratio_prefetch_2_vs_distinct": per_sec["prefetch_2"] / per_sec["step_distinct"],
         "device_step_fixed_refs_examples_per_sec": per_sec["device_step_fixed_refs"],
         "loop_examples_per_sec_device_batches_per_call": per_sec["device_batches_per_call"],
         "ratio_device_batches_per_call": (per_sec["device_batches_per_call"] /
                                           per_sec["step_only"]),
         # The loop against the same K-step program on references made once.
         "ratio_device_batches_per_call_vs_fixed_refs": (
             per_sec["device_batches_per_call"] / per_sec["device_steps_per_call_fixed_refs"]),
         "device_steps_per_call_fixed_refs_examples_per_sec":
             per_sec["device_steps_per_call_fixed_refs"],
         "steps_per_call": per_call,
         "goal": 0.95, "prefetch_workers": workers})


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rounds = _ROUNDS.value
  if rounds <= 0:
    cli.fail(f"--rounds must be a positive integer, got {rounds}.")
  quick = _QUICK.value
  unknown = [name for name in _LOOPS.value if name not in _VALID_LOOPS]
  if unknown:
    cli.fail(f"--loops: unknown {', '.join(unknown)}; valid: {', '.join(_VALID_LOOPS)}.")
  if not all(b.isdigit() and int(b) > 0 for b in _RESNET_BATCH_SIZES.value):
    cli.fail(f"--resnet_batch_sizes must be positive integers, got "
             f"{','.join(_RESNET_BATCH_SIZES.value)}.")
  if _WORKERS.value <= 0:
    cli.fail(f"--workers must be a positive integer, got {_WORKERS.value}.")
  if _STEPS_PER_CALL.value <= 0:
    cli.fail(f"--steps_per_call must be a positive integer, got {_STEPS_PER_CALL.value}.")
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import data  # pylint: disable=g-import-not-at-top
  _emit({"figure": "machine", "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count()})

  cifar = _pipeline("cifar100", _cifar_source(512 if quick else 4096), batch_size=128)
  _pipeline_alone("cifar_crop_flip_normalise", cifar, 2 if quick else 20, rounds)
  imagenet = _pipeline("imagenet2012", _jpeg_source(16 if quick else 64), batch_size=32)
  _pipeline_alone("imagenet_jpeg_inception_crop", imagenet, 1 if quick else 4, rounds)

  if "quickstart" in _LOOPS.value:
    if _SYNTHETIC_MNIST1D.value:
      mnist1d = _pipeline("mnist1d", _mnist1d_like_source(4000), batch_size=128)
    else:
      try:
        mnist1d = data.InputPipeline("mnist1d", global_batch_size=128, seed=0,
                                     data_dir=_DATA_DIR.value)
      except data.DatasetNotPreparedError as error:
        cli.fail(str(error))
    name = "quickstart mlp <- cnn1d" + (" (synthetic signals)" if _SYNTHETIC_MNIST1D.value else "")
    _loop_vs_step(name, "mlp", "cnn1d", mnist1d,
                  steps=5 if quick else 200, rounds=rounds, workers=_WORKERS.value,
                  steps_per_call=_STEPS_PER_CALL.value)
  if "resnet8x4" in _LOOPS.value:
    for batch_size in map(int, _RESNET_BATCH_SIZES.value):
      source = _cifar_source(512 if quick else max(4096, 16 * batch_size))
      cifar32 = _pipeline("cifar100", source, batch_size=batch_size)
      _loop_vs_step("resnet8x4 <- resnet32x4", "resnet8x4", "resnet32x4", cifar32,
                    steps=2 if quick else 15, rounds=rounds, workers=_WORKERS.value,
                    steps_per_call=_STEPS_PER_CALL.value)

if __name__ == "__main__":
  cli.run(main, config_name=None)
