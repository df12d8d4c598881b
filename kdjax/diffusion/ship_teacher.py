"""Makes the shipped digits assets from a trained teacher, and measures the teacher with them.

    python -m kdjax.diffusion.train_teacher --out=/tmp/digits_teacher_ema.msgpack \
        --results=/tmp/digits_teacher_results.json                   # ~12 min, 2 CPU cores
    python -m kdjax.diffusion.ship_teacher --ema=/tmp/digits_teacher_ema.msgpack \
        --train_results=/tmp/digits_teacher_results.json             # ~3 min

writes into `kdjax/assets/`:
  digits_teacher.msgpack     the EMA weights as a kdjax exported model `digits_unet`
                             (`denoiser_model.DigitsDenoiser`, EDM preconditioning, σ_d 0.85)
  digits_classifier.msgpack  the FD / precision / recall / coverage classifier
                             (`classifier.DigitsClassifier`, trained here: seed 0, 1,500 steps)
  digits_teacher.json        the teacher's config and its measured quality per sampler and NFE
                             (1,000 class-balanced samples from fixed noise, seed 1234, against
                             the 300 held-out digits, in the shipped classifier's embedding)
"""

import argparse
import json
import os
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.diffusion import classifier, denoiser_model, digits, quality
from kdjax.train import checkpoint

CLASSIFIER_FILE = os.path.join(denoiser_model.ASSETS, "digits_classifier.msgpack")
CLASSIFIER_MODEL = "digits_classifier"
METADATA_FILE = os.path.join(denoiser_model.ASSETS, "digits_teacher.json")
# (sampler, steps) measured for the metadata: the quickstart's teacher rows and more.
SETTINGS = (("heun", 18), ("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("ddim", 1),
            ("ddim", 2), ("ddim", 4), ("ddim", 8), ("heun", 2), ("heun", 3), ("heun", 5))


def export_teacher(ema_file: str, meta: dict, path: str = denoiser_model.TEACHER_FILE) -> int:
  """Wraps `train_teacher`'s raw EMA params ({'params': {'unet': ...}}) and exports them."""
  module = denoiser_model.DigitsDenoiser()
  template = module.init(jax.random.PRNGKey(0), jnp.zeros((1,) + digits.IMAGE_SHAPE))
  with open(ema_file, "rb") as f:
    unet_params = flax.serialization.from_bytes(template["params"]["unet"], f.read())
  return checkpoint.export_model_variables({"params": {"unet": unet_params}}, path,
                                           model_name=denoiser_model.TEACHER_MODEL, meta=meta)


def export_classifier(data: digits.Digits, path: str = CLASSIFIER_FILE, seed: int = 0) -> int:
  module, variables = classifier.train_classifier(data.train_images, data.train_labels, seed=seed)
  accuracy = float(np.mean(classifier.embed(module, variables, data.test_images)[1]
                           == data.test_labels))
  return checkpoint.export_model_variables(
      variables, path, model_name=CLASSIFIER_MODEL,
      meta={"trained_by": "kdjax.diffusion.classifier.train_classifier", "seed": seed,
            "steps": 1500, "held_out_accuracy": accuracy})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ema", required=True, help="train_teacher's --out file")
  parser.add_argument("--train_results", default="", help="train_teacher's --results file")
  parser.add_argument("--num_samples", type=int, default=quality.NUM_SAMPLES)
  args = parser.parse_args(argv)
  data = digits.load()
  trained = json.load(open(args.train_results)) if args.train_results else {}
  meta = {"config": trained.get("config"), "num_params": trained.get("num_params"),
          "train_seconds": trained.get("train_seconds"), "final_loss": trained.get("final_loss"),
          "command": "python -m kdjax.diffusion.train_teacher (defaults)"}
  print("teacher bytes", export_teacher(args.ema, meta), flush=True)
  print("classifier bytes", export_classifier(data), flush=True)
  judge = quality.Judge.shipped()
  apply_fn = quality._plain_apply(denoiser_model.DigitsDenoiser().apply)  # pylint: disable=protected-access
  variables = denoiser_model.teacher_variables()
  results = {"teacher": meta, "num_samples": args.num_samples,
             "classifier_held_out_accuracy": checkpoint.exported_meta(CLASSIFIER_FILE)[
                 "held_out_accuracy"],
             "reference_train_split": judge.scores(data.train_images)}
  for sampler, steps in SETTINGS:
    start = time.time()
    row = quality.teacher_row(apply_fn, variables, judge, sampler=sampler, num_steps=steps,
                              num_samples=args.num_samples)
    results[f"{sampler}{steps}"] = dict(row, seconds=round(time.time() - start, 1))
    print(sampler, steps, json.dumps(results[f"{sampler}{steps}"]), flush=True)
  with open(METADATA_FILE, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
