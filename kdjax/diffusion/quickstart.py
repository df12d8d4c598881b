"""The diffusion quickstart: the suite's student rows (trained by `kdjax.train.run_suite`),
then every row's sample quality added to `summary.json` (and a table, sample grids and the
FD-vs-NFE plot next to it).

    python -m kdjax.diffusion.quickstart --config=configs/diffusion_quickstart.py --workdir=DIR

`add_sample_quality(workdir, config)` is the part after training: teacher rows `teacher_nfe<k>`
(the best of Euler / Heun / DDIM at k NFE; `teacher_full`: Heun 18, 35 NFE) and, for each
finished student run, `quality.student_row` at each of its method's samplers (`sampling()`),
written to `summary.json['diffusion']` as {row: {metrics}} (seeds: mean, std, per seed).
Why it is not in the trunk's run summary: the eval step's metrics are per-example sums and no
hook hands a method the trained variables at the end of a run; see docs/diffusion.md.
"""

import argparse
import importlib
import json
import os
import time
from typing import Dict, List

import numpy as np

from kdjax.diffusion import denoiser_model, quality, sampling

TEACHER_SAMPLERS = ("euler", "heun", "ddim")


def _heun_steps_for(nfe: int):
  return (nfe + 1) // 2 if nfe % 2 == 1 else None


def teacher_rows(nfes, num_samples: int) -> Dict[str, dict]:
  """{'teacher_nfe<k>': the best (lowest FD) of Euler / Heun / DDIM at k NFE,
  'teacher_full': Heun 18 (35 NFE)}, each with its `sampler`."""
  apply = quality._plain_apply(denoiser_model.DigitsDenoiser().apply)  # pylint: disable=protected-access
  variables = denoiser_model.teacher_variables()
  rows = {}
  for nfe in nfes:
    candidates = [("euler", nfe), ("ddim", nfe)]
    if _heun_steps_for(nfe) and nfe > 1:
      candidates.append(("heun", _heun_steps_for(nfe)))
    results = [quality.teacher_row(apply, variables, sampler=s, num_steps=k,
                                   num_samples=num_samples) for s, k in candidates]
    best = min(results, key=lambda r: r["eval_fd"])
    best["candidates"] = {f"{r['sampler']}{r['sampler_steps']}": r["eval_fd"] for r in results}
    rows[f"teacher_nfe{nfe}"] = best
  rows["teacher_full"] = quality.teacher_row(apply, variables, sampler="heun", num_steps=18,
                                             num_samples=num_samples)
  return rows


def student_rows(workdir: str, num_samples: int) -> Dict[str, dict]:
  """Each finished student run's quality per sampler setting: {'<row>@<sampler><k>':
  {seed or 'run': metrics}}."""
  from kdjax.methods.registry import build_method  # pylint: disable=g-import-not-at-top
  from kdjax.train.load import load_run  # pylint: disable=g-import-not-at-top
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  rows: Dict[str, dict] = {}
  for row, result in summary["runs"].items():
    seeds = result.get("seeds") or {"run": result}
    for seed in seeds:
      run = row if seed == "run" else os.path.join(row, f"seed{seed}")
      loaded = load_run(workdir, run=run)
      method = build_method(loaded.config)
      for sampler, steps in method.sampling():
        key = f"{row}@{sampler}{steps}"
        rows.setdefault(key, {})[seed] = quality.student_row(
            loaded.apply_fn, loaded.variables, sampler=sampler, num_steps=steps,
            num_samples=num_samples)
  return rows


def _aggregate(per_seed: Dict[str, dict]) -> dict:
  first = next(iter(per_seed.values()))
  row = {k: v for k, v in first.items() if not isinstance(v, float)}
  std = {}
  for key, value in first.items():
    if isinstance(value, float):
      values = np.array([r[key] for r in per_seed.values()], np.float64)
      row[key] = float(values.mean())
      std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return dict(row, std=std, num_seeds=len(per_seed), seeds=per_seed)


def add_sample_quality(workdir: str, config) -> dict:
  """Writes summary.json['diffusion'] (teacher and student rows) and returns it."""
  settings = config.get("diffusion", {})
  num_samples = int(settings.get("num_samples", quality.NUM_SAMPLES))
  rows = teacher_rows(tuple(settings.get("teacher_rows", (1, 2, 4, 8))), num_samples)
  rows.update({k: _aggregate(v) for k, v in student_rows(workdir, num_samples).items()})
  path = os.path.join(workdir, "summary.json")
  summary = json.load(open(path))
  summary["diffusion"] = {"num_samples": num_samples, "rows": rows}
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)
  return summary["diffusion"]


def table(diffusion: dict) -> str:
  """A markdown table: row, NFE, FD (± std over seeds), precision, recall, coverage, distance."""
  lines = ["| row | NFE | FD | precision | recall | coverage | distance to teacher ODE |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, row in diffusion["rows"].items():
    std = row.get("std", {})
    cell = lambda k: (f"{row[k]:.2f}" + (f" ± {std[k]:.2f}" if std.get(k) else "")
                      if k in row else "")
    lines.append(f"| {name} | {row['eval_nfe']} | {cell('eval_fd')} | {cell('eval_precision')} "
                 f"| {cell('eval_recall')} | {cell('eval_class_coverage')} | "
                 f"{cell('eval_teacher_distance')} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--skip_training", action="store_true")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import train  # pylint: disable=g-import-not-at-top
  path, _, variant = args.config.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = module.get_config(variant or None)
  start = time.time()
  if not args.skip_training:
    train.run_suite(config, args.workdir, num_devices=jax.device_count())
  trained = time.time()
  diffusion = add_sample_quality(args.workdir, config)
  text = table(diffusion)
  with open(os.path.join(args.workdir, "diffusion_table.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  print(f"training {trained - start:.0f}s, sample quality {time.time() - trained:.0f}s")


if __name__ == "__main__":
  main()
