"""Sample quality of a denoiser model from fixed noise: the numbers of a diffusion row.

For `num_samples` class-balanced samples (label i % 10) from fixed noise (`NOISE_SEED`):

  eval_fd               Fréchet distance to the 300 held-out digits in the shipped classifier's
                        embedding (FID's recipe with a domain classifier; `metrics.py`)
  eval_precision / eval_recall   k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019)
  eval_class_coverage   the fraction of classes given > 2% of the samples by the classifier
  eval_nfe              network evaluations per sample
  eval_teacher_distance for students: the mean over samples of the RMS pixel distance between
                        the student's sample and the teacher's ODE solution (Heun, 18 steps,
                        35 NFE) from the same noise and label

Everything runs on the host after training (numpy float64 metrics, one jitted sampler).

`final_metrics` is what a diffusion method's `Method.final_metrics` returns into the run's
summary: the student's numbers at each of its sampler settings (suffix `_nfe<k>`; the first
setting also without suffix), beside the teacher's best FD at the same NFE (Euler, Heun or
DDIM, `teacher_best`) and at its full 35-NFE Heun solve — so each row of the report carries
its own teacher comparison, and no teacher-only pseudo-runs are needed.
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.diffusion import classifier, denoiser_model, digits, metrics, sampling

NUM_SAMPLES = 1000
NOISE_SEED = 1234
REFERENCE_SAMPLER = ("heun", 18)  # The teacher's full-step ODE solution (35 NFE).
SCORE_KEYS = ("eval_fd", "eval_precision", "eval_recall", "eval_class_coverage")


class Judge(NamedTuple):
  """The shipped classifier and the held-out set's embedding."""
  embedder: classifier.Embedder
  test_features: np.ndarray

  @classmethod
  @functools.lru_cache(maxsize=1)
  def shipped(cls) -> "Judge":
    from kdjax.train import checkpoint  # pylint: disable=g-import-not-at-top
    from kdjax.diffusion import ship_teacher  # pylint: disable=g-import-not-at-top
    module = classifier.DigitsClassifier()
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1,) + digits.IMAGE_SHAPE)))
    variables = checkpoint.load_exported_variables(
        ship_teacher.CLASSIFIER_FILE, expected, model_name=ship_teacher.CLASSIFIER_MODEL)
    embedder = classifier.Embedder(module, variables)
    return cls(embedder, embedder(digits.load().test_images)[0])

  def scores(self, images) -> Dict[str, float]:
    """FD, precision, recall and class coverage of images [N, 8, 8, 1] (clipped to [−1, 1])."""
    features, predictions = self.embedder(np.clip(np.asarray(images), -1.0, 1.0))
    return {"eval_fd": metrics.frechet_distance(features, self.test_features),
            **{f"eval_{k}": v for k, v in
               metrics.precision_recall(self.test_features, features).items()},
            "eval_class_coverage": metrics.class_coverage(predictions, digits.NUM_CLASSES,
                                                          min_fraction=0.02)}


def fixed_noise(num_samples: int = NUM_SAMPLES):
  """(noise [N, 8, 8, 1], labels [N] = i % 10): the same for every row and seed."""
  noise = jax.random.normal(jax.random.PRNGKey(NOISE_SEED), (num_samples,) + digits.IMAGE_SHAPE)
  return noise, jnp.arange(num_samples, dtype=jnp.int32) % digits.NUM_CLASSES


@functools.lru_cache(maxsize=16)
def _sampler(apply: Callable, sampler: str, num_steps: int):
  return jax.jit(lambda variables, noise, labels: sampling.sample(
      apply, variables, noise, labels, sampler=sampler, num_steps=num_steps))


def generate(apply: Callable, variables: Any, *, sampler: str, num_steps: int,
             num_samples: int = NUM_SAMPLES, batch_size: int = 500) -> np.ndarray:
  """Samples [N, 8, 8, 1] from `fixed_noise(N)`, in batches of `batch_size`."""
  noise, labels = fixed_noise(num_samples)
  run = _sampler(apply, sampler, num_steps)
  return np.concatenate([np.asarray(run(variables, noise[i:i + batch_size],
                                        labels[i:i + batch_size]))
                         for i in range(0, num_samples, batch_size)])


@functools.lru_cache(maxsize=2)
def teacher_solution(num_samples: int = NUM_SAMPLES) -> np.ndarray:
  """The shipped teacher's Heun-18 samples from `fixed_noise(num_samples)` (computed once)."""
  apply = denoiser_model.DigitsDenoiser().apply
  apply_fn = _plain_apply(apply)
  return generate(apply_fn, denoiser_model.teacher_variables(), sampler=REFERENCE_SAMPLER[0],
                  num_steps=REFERENCE_SAMPLER[1], num_samples=num_samples)


@functools.lru_cache(maxsize=4)
def _plain_apply(module_apply):
  return lambda variables, inputs, train=False, rng=None: (module_apply(variables, inputs), {})


def teacher_row(apply: Callable, variables: Any, judge: Optional[Judge] = None, *,
                sampler: str, num_steps: int, num_samples: int = NUM_SAMPLES) -> Dict[str, Any]:
  """A teacher row: its scores at (sampler, num_steps) and `eval_nfe`."""
  judge = judge or Judge.shipped()
  images = generate(apply, variables, sampler=sampler, num_steps=num_steps,
                    num_samples=num_samples)
  return {**judge.scores(images), "eval_nfe": sampling.nfe(sampler, num_steps),
          "sampler": sampler, "sampler_steps": num_steps}


def student_row(apply: Callable, variables: Any, judge: Optional[Judge] = None, *,
                sampler: str, num_steps: int, num_samples: int = NUM_SAMPLES,
                with_images: bool = False) -> Dict[str, Any]:
  """A student's scores, NFE and distance to the teacher's ODE solution from the same noise."""
  judge = judge or Judge.shipped()
  images = generate(apply, variables, sampler=sampler, num_steps=num_steps,
                    num_samples=num_samples)
  reference = teacher_solution(num_samples)
  distance = np.sqrt(np.mean(np.square(np.clip(images, -1, 1) - reference), axis=(1, 2, 3)))
  row = {**judge.scores(images), "eval_nfe": sampling.nfe(sampler, num_steps),
         "eval_teacher_distance": float(np.mean(distance)), "sampler": sampler,
         "sampler_steps": num_steps}
  if with_images:
    row["images"] = images
  return row


def _teacher_candidates(nfe: int):
  """(sampler, steps) of the teacher with exactly `nfe` NFE: Euler, DDIM, and Heun when
  2·steps − 1 = nfe has a solution with steps ≥ 2."""
  candidates = [("euler", nfe), ("ddim", nfe)]
  if nfe > 1 and nfe % 2 == 1:
    candidates.append(("heun", (nfe + 1) // 2))
  return candidates


@functools.lru_cache(maxsize=32)
def teacher_best(nfe: int, num_samples: int = NUM_SAMPLES) -> Dict[str, Any]:
  """The shipped teacher's lowest-FD row among its samplers at `nfe` NFE (with `candidates`:
  {'<sampler><steps>': FD}); computed once per process (the noise is fixed)."""
  apply = _plain_apply(denoiser_model.DigitsDenoiser().apply)
  variables = denoiser_model.teacher_variables()
  results = [teacher_row(apply, variables, sampler=s, num_steps=k, num_samples=num_samples)
             for s, k in _teacher_candidates(nfe)]
  best = dict(min(results, key=lambda r: r["eval_fd"]))
  best["candidates"] = {f"{r['sampler']}{r['sampler_steps']}": r["eval_fd"] for r in results}
  return best


@functools.lru_cache(maxsize=2)
def teacher_full(num_samples: int = NUM_SAMPLES) -> Dict[str, Any]:
  """The shipped teacher's row at its full solve (`REFERENCE_SAMPLER`, Heun 18: 35 NFE)."""
  apply = _plain_apply(denoiser_model.DigitsDenoiser().apply)
  return teacher_row(apply, denoiser_model.teacher_variables(), sampler=REFERENCE_SAMPLER[0],
                     num_steps=REFERENCE_SAMPLER[1], num_samples=num_samples)


def final_metrics(apply: Callable, variables: Any, settings, *,
                  num_samples: int = NUM_SAMPLES) -> Dict[str, Any]:
  """A student's summary numbers at each (sampler, steps) of `settings` (a method's
  `sampling()`), flat so that the suite averages them over seeds:

    eval_<score>_nfe<k>, eval_teacher_distance_nfe<k>   the student at k NFE
    eval_teacher_fd_nfe<k>, teacher_sampler_nfe<k>      the teacher's best at k NFE
    eval_<score>, eval_nfe, eval_teacher_distance       the first setting again (unsuffixed)
    eval_teacher_full_fd, eval_teacher_full_nfe         the teacher's full solve (35 NFE)
    sample_settings                                     'consistency1,consistency2,...'
  """
  out: Dict[str, Any] = {}
  for i, (sampler, steps) in enumerate(settings):
    row = student_row(apply, variables, sampler=sampler, num_steps=steps,
                      num_samples=num_samples)
    nfe = row["eval_nfe"]
    numbers = {k: row[k] for k in SCORE_KEYS + ("eval_teacher_distance",)}
    out.update({f"{k}_nfe{nfe}": v for k, v in numbers.items()})
    teacher = teacher_best(nfe, num_samples)
    out[f"eval_teacher_fd_nfe{nfe}"] = teacher["eval_fd"]
    out[f"teacher_sampler_nfe{nfe}"] = f"{teacher['sampler']}{teacher['sampler_steps']}"
    if i == 0:
      out.update(numbers, eval_nfe=nfe)
  full = teacher_full(num_samples)
  out.update(eval_teacher_full_fd=full["eval_fd"], eval_teacher_full_nfe=full["eval_nfe"],
             eval_samples=num_samples,
             sample_settings=",".join(f"{s}{k}" for s, k in settings))
  return out
