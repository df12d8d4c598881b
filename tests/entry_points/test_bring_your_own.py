"""Bring your own model and data: the adapters (linen, NNX, plain functions), registration of
models and numpy datasets, a whole suite on them, `kdjax.load_run` and provenance."""

import ast
import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax
from flax import nnx
import flax.linen as nn

import kdjax
from configs import common
from kdjax import data, models
from kdjax.data import catalog
from kdjax.models import adapters
from kdjax.models.output import Output
from kdjax.train import provenance, run_suite
from kdjax.train.checkpoint import save_model_variables
from kdjax.train.validate import ConfigError, validate_config

_DIM, _HIDDEN, _CLASSES = 16, 12, 4


class NnxMLP(nnx.Module):
  """Linear -> ReLU -> BatchNorm -> Dropout -> Linear; sows its embedding."""

  def __init__(self, num_classes: int, hidden: int = _HIDDEN, dropout: float = 0.1, *,
               rngs: nnx.Rngs):
    self.hidden = nnx.Linear(_DIM, hidden, rngs=rngs)
    self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x):
    h = self.drop(self.norm(nnx.relu(self.hidden(x))))
    self.sow(nnx.Intermediate, "embedding", h)
    return self.head(h)


class NnxTinyStudent(nnx.Module):
  """A linear student returning `Output` with its own 'embedding' tap."""

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    self.head = nnx.Linear(_DIM, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    del train
    return Output(self.head(x), {"embedding": x})


class NnxCausalLM(nnx.Module):
  """Embedding, one causal single-head self-attention (values = inputs), unembedding: logits
  [B, T, V] and the final hidden states [B, T, D]."""

  def __init__(self, vocab: int = 11, width: int = 8, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, rngs=rngs)
    self.unembed = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    scores = self.query(x) @ jnp.swapaxes(self.key(x), -1, -2) / jnp.sqrt(x.shape[-1])
    causal = jnp.tril(jnp.ones((tokens.shape[-1],) * 2, bool))
    x = x + jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1) @ x
    return Output(self.unembed(x), {"hidden": x})


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_nnx_mlp_matches_numpy_in_eval_and_train_mode():
  fns = adapters.from_nnx(lambda rngs: NnxMLP(_CLASSES, dropout=0.5, rngs=rngs))
  x = np.random.default_rng(0).normal(size=(6, _DIM)).astype(np.float32)
  variables = fns.init(jax.random.PRNGKey(0), x)
  assert sorted(variables) == ["batch_stats", "params"]
  p, stats = _np(variables["params"]), _np(variables["batch_stats"])
  hidden = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)

  output, new_state = jax.jit(lambda v: fns.apply(v, x, train=False))(variables)
  eps = 1e-5  # nnx.BatchNorm's default.
  normed = ((hidden - stats["norm"]["mean"]) / np.sqrt(stats["norm"]["var"] + eps)
            * p["norm"]["scale"] + p["norm"]["bias"])
  np.testing.assert_allclose(output.logits, normed @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(output.features["embedding"], normed, rtol=1e-5, atol=1e-5)
  assert new_state == {}

  train = jax.jit(lambda v, rng: fns.apply(v, x, train=True, rng=rng))
  (first, state), (again, _), (other, _) = (train(variables, jax.random.PRNGKey(1)),
                                            train(variables, jax.random.PRNGKey(1)),
                                            train(variables, jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(first.logits, again.logits)  # Dropout keys come from `rng`.
  assert not np.allclose(first.logits, other.logits)
  dropped = np.asarray(first.features["embedding"]) == 0
  assert 0.2 < dropped.mean() < 0.8  # Rate 0.5, 72 units.
  # Running statistics: momentum 0.9 towards the batch mean / (biased) variance.
  np.testing.assert_allclose(state["batch_stats"]["norm"]["mean"],
                             0.9 * stats["norm"]["mean"] + 0.1 * hidden.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["norm"]["var"],
                             0.9 * stats["norm"]["var"] + 0.1 * hidden.var(0), rtol=1e-5)
  # Each seed initialises anew (one compilation: same shapes); shapes trace abstractly.
  other_seed = fns.init(jax.random.PRNGKey(1), x)
  assert not np.allclose(other_seed["params"]["hidden"]["kernel"], p["hidden"]["kernel"])
  shapes = jax.eval_shape(fns.init, jax.random.PRNGKey(0), x)
  assert shapes["params"]["head"]["kernel"].shape == (_HIDDEN, _CLASSES)


def test_nnx_causal_lm_gives_sequence_logits_and_is_causal():
  fns = adapters.from_nnx(lambda rngs: NnxCausalLM(rngs=rngs))
  tokens = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
  variables = fns.init(jax.random.PRNGKey(0), tokens)
  apply = jax.jit(lambda v, t: fns.apply(v, t, train=False))
  output, _ = apply(variables, tokens)
  assert output.logits.shape == (2, 5, 11) and output.features["hidden"].shape == (2, 5, 8)
  changed = tokens.copy()
  changed[:, 3:] = 0  # Later tokens must not change earlier positions' logits.
  changed_output, _ = apply(variables, changed)
  np.testing.assert_allclose(output.logits[:, :3], changed_output.logits[:, :3], atol=1e-6)
  assert not np.allclose(output.logits[:, 3:], changed_output.logits[:, 3:])


def test_nnx_instance_keeps_its_own_weights():
  model = NnxTinyStudent(3, rngs=nnx.Rngs(5))
  fns = adapters.from_nnx(model)
  variables = fns.init(jax.random.PRNGKey(0), None)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], model.head.kernel[...])
  x = np.ones((2, _DIM), np.float32)
  output, _ = jax.jit(lambda v: fns.apply(v, x, train=True))(variables)
  p = _np(variables["params"])
  np.testing.assert_allclose(output.logits, x @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-5)


def test_plain_functions_and_bare_logits():
  weights = np.arange(_DIM * 3, dtype=np.float32).reshape(_DIM, 3) / 100

  def init(rng, sample_inputs):
    del rng, sample_inputs
    return {"params": {"w": weights}, "counter": {"n": np.zeros((), np.int32)}}

  def apply(variables, inputs, *, train):
    logits = inputs @ variables["params"]["w"]
    return logits, {"counter": {"n": variables["counter"]["n"] + 1}}

  fns = adapters.from_functions(init, apply)
  x = np.random.default_rng(1).normal(size=(4, _DIM)).astype(np.float32)
  variables = fns.init(jax.random.PRNGKey(0), x)
  output, state = fns.apply(variables, x, train=True, rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(output.logits, x.astype(np.float64) @ weights, rtol=1e-5)
  assert output.features == {} and int(state["counter"]["n"]) == 1
  assert fns.apply(variables, x, train=False)[1] == {}  # No state update in eval mode.
  bad = adapters.from_functions(lambda rng, x: {"w": 1}, apply)
  with pytest.raises(ValueError, match="'params'"):
    bad.init(None, x)


def test_linen_sow_becomes_a_tap():
  class Sowing(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
      h = nn.Dense(5, name="hidden")(x)
      self.sow("intermediates", "embedding", h)
      return nn.Dense(3, name="head")(h)

  fns = adapters.from_linen(Sowing())
  x = np.ones((2, _DIM), np.float32)
  variables = jax.jit(fns.init)(jax.random.PRNGKey(0), x)
  assert sorted(variables) == ["params"]  # Sown values are outputs, not variables.
  output, _ = jax.jit(lambda v: fns.apply(v, x, train=False))(variables)
  p = _np(variables["params"])
  np.testing.assert_allclose(output.features["embedding"],
                             x @ p["hidden"]["kernel"] + p["hidden"]["bias"], rtol=1e-5)


@pytest.fixture
def registered():
  """Names registered by a test, removed after it."""
  names = {"models": [], "datasets": []}
  yield names
  for name in names["models"]:
    models.unregister(name)
  for name in names["datasets"]:
    data.unregister(name)


def test_register_model_rules(registered):
  registered["models"].append("byo_rules")
  models.register("byo_rules", NnxTinyStudent, input_kind="vec16")
  with pytest.raises(ValueError, match="already registered; pass replace=True"):
    models.register("byo_rules", NnxTinyStudent, input_kind="vec16")
  models.register("byo_rules", NnxMLP, input_kind="vec16", replace=True)
  assert "norm" in jax.eval_shape(models.get_model_fns("byo_rules", num_classes=3).init,
                                  jax.random.PRNGKey(0), None)["params"]
  with pytest.raises(ValueError, match="built-in model"):
    models.register("mlp", NnxMLP, input_kind="signal1d", replace=True)
  with pytest.raises(TypeError, match="get_model_fns"):
    models.get_model("byo_rules", num_classes=3)
  with pytest.raises(ValueError, match=r"Unknown model 'byo_nope'; valid models: .*byo_rules"):
    models.get_model_fns("byo_nope", num_classes=3)
  with pytest.raises(ValueError, match="input_kind"):
    models.register("byo_kindless", NnxMLP, input_kind="")
  assert models.get_model("mlp", num_classes=10).num_classes == 10  # Built-ins unchanged.


def test_register_arrays_rules(registered):
  x, y = np.zeros((8, _DIM), np.float32), np.arange(8) % _CLASSES
  registered["datasets"].append("byo_rules")
  spec = data.register_arrays("byo_rules", train=(x, y), eval=(x[:4], y[:4]),
                              num_classes=_CLASSES, input_kind="vec16")
  assert spec.input_shape == (_DIM,) and spec.train_examples == 8
  with pytest.raises(ValueError, match="already registered"):
    data.register_arrays("byo_rules", train=(x, y), eval=(x, y), num_classes=_CLASSES,
                         input_kind="vec16")
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*label 4 at row 4"):
    data.register_arrays("byo_bad", train=(x, np.arange(8)), eval=(x, y), num_classes=4,
                         input_kind="vec16")
  with pytest.raises(ValueError, match=r"shapes \(8, 16\) and \(7,\)"):
    data.register_arrays("byo_bad", train=(x, y[:7]), eval=(x, y), num_classes=4,
                         input_kind="vec16")
  with pytest.raises(ValueError, match="built-in dataset"):
    data.register("mnist1d", spec, replace=True)
  assert "byo_bad" not in catalog.DATASETS
  config = common.base_config()
  config.dataset = "byo_nope"
  with pytest.raises(ConfigError, match="byo_rules"):  # Registered names are listed as valid.
    validate_config(config, num_devices=1)


_CENTRES = np.random.default_rng(42).normal(size=(_CLASSES, _DIM)) * 3.0


def _clusters(count: int, seed: int):
  """Four well separated Gaussian clusters (unit noise) in 16 dimensions."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, _CLASSES, size=count)
  return (_CENTRES[labels] + rng.normal(size=(count, _DIM))).astype(np.float32), labels


def _teacher_variables():
  """The Bayes classifier of the clusters (equal isotropic noise): logit_c = <x, mu_c> -
  |mu_c|^2 / 2, as the linear NNX model's parameters."""
  return {"params": {"head": {"kernel": _CENTRES.T.astype(np.float32),
                              "bias": (-0.5 * (_CENTRES ** 2).sum(1)).astype(np.float32)}}}


def _suite_config(teacher_checkpoint: str):
  config = common.base_config()
  config.dataset, config.num_classes = "byo_clusters", _CLASSES
  config.student.model, config.teacher.model = "byo_student", "byo_teacher"
  config.suite, config.teacher.checkpoint, config.num_steps = "kd", teacher_checkpoint, 20
  config.global_batch_size, config.eval_batch_size = 32, 128
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 20
  config.progress, config.prefetch = False, 0
  config.optimizer.learning_rate = 0.05
  return config


@pytest.fixture(scope="module")
def suite_workdir(tmp_path_factory):
  """A suite on numpy clusters: an NNX MLP student (BatchNorm, dropout) distilled with kd from
  a linear NNX teacher given as a checkpoint."""
  train, evaluation = _clusters(256, 0), _clusters(128, 1)
  models.register("byo_teacher", NnxTinyStudent, input_kind="vec16", replace=True)
  models.register("byo_student", NnxMLP, input_kind="vec16", replace=True)
  data.register_arrays("byo_clusters", train=train, eval=evaluation, num_classes=_CLASSES,
                       input_kind="vec16", replace=True)
  root = tmp_path_factory.mktemp("byo")
  teacher = save_model_variables(str(root / "teacher"), _teacher_variables(),
                                 model_name="byo_teacher")
  workdir = root / "suite"
  summary = run_suite(_suite_config(teacher), str(workdir), num_devices=jax.device_count())
  yield workdir, summary, train, evaluation
  models.unregister("byo_teacher")
  models.unregister("byo_student")
  data.unregister("byo_clusters")


def test_suite_trains_registered_nnx_models_on_numpy_arrays(suite_workdir):
  _, summary, _, (eval_inputs, eval_labels) = suite_workdir
  kd = summary["runs"]["kd"]
  teacher = _np(_teacher_variables()["params"]["head"])
  teacher_logits = eval_inputs @ teacher["kernel"] + teacher["bias"]
  assert kd["teacher_eval_accuracy"] == pytest.approx(
      np.mean(teacher_logits.argmax(-1) == eval_labels), abs=1e-6)
  assert kd["teacher_eval_accuracy"] >= 0.95
  assert kd["eval_accuracy"] >= 0.8 and kd["method"] == "kd" and kd["steps"] == 20, kd
  assert kd["student_params"] == (_DIM * _HIDDEN + _HIDDEN) + 2 * _HIDDEN + (
      _HIDDEN * _CLASSES + _CLASSES)  # hidden, BatchNorm scale and bias, head.


def _reference_fingerprint(inputs, labels) -> str:
  """The split's sha256 as provenance documents it: fields in name order, each as
  'name|dtype|shape|' then its bytes."""
  digest = hashlib.sha256()
  for key, array in (("inputs", inputs), ("label", labels.astype(np.int32))):
    digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def test_provenance_in_run_and_suite_summaries(suite_workdir):
  workdir, _, train, evaluation = suite_workdir
  expected_datasets = {
      "byo_clusters/train": {"examples": 256, "sha256": _reference_fingerprint(*train)},
      "byo_clusters/eval": {"examples": 128, "sha256": _reference_fingerprint(*evaluation)}}
  with open(workdir / "summary.json") as f:
    suite = json.load(f)["provenance"]
  with open(workdir / "kd" / "run_summary.json") as f:
    run = json.load(f)["provenance"]
  for record in (suite, run):
    assert record["datasets"] == expected_datasets
    assert record["versions"]["jax"] == jax.__version__
    assert record["versions"]["flax"] == flax.__version__
    assert record["versions"]["kdjax"] == kdjax.__version__
    assert set(record["versions"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                       "orbax-checkpoint", "grain", "kdjax"}
    assert record["device_count"] == jax.device_count() and record["process_count"] == 1
    assert record["device_kind"] == jax.devices()[0].device_kind
    # The repository is a git checkout: a 40-hex commit and a dirty flag.
    assert len(record["git_commit"]) == 40 and isinstance(record["git_dirty"], bool)


def test_provenance_outside_git_is_none(tmp_path):
  assert provenance.code_version(str(tmp_path)) == {"git_commit": None, "git_dirty": None}


def test_load_run_gives_the_trained_student(suite_workdir, monkeypatch):
  workdir, summary, _, (eval_inputs, eval_labels) = suite_workdir
  monkeypatch.chdir(workdir.parent)  # Relative paths resolve from here.
  loaded = kdjax.load_run(workdir.name, run="kd")  # Relative to the current directory.
  assert loaded.config.student.model == "byo_student"
  assert loaded.summary["eval_accuracy"] == summary["runs"]["kd"]["eval_accuracy"]
  assert sorted(loaded.variables) == ["batch_stats", "params"]  # The student's only.
  output, _ = loaded.apply_fn(loaded.variables, eval_inputs, train=False)
  accuracy = float(np.mean(np.argmax(np.asarray(output.logits), -1) == eval_labels))
  assert accuracy == pytest.approx(loaded.summary["eval_accuracy"], abs=1e-6)
  same = kdjax.load_run(workdir / "kd")  # The run directory itself; one run: no run= needed.
  equal = jax.tree.map(np.array_equal, same.variables, loaded.variables)
  assert all(jax.tree.leaves(equal)) and kdjax.load_run(workdir).summary == loaded.summary


def test_load_run_names_the_runs_when_ambiguous(suite_workdir, tmp_path):
  workdir = suite_workdir[0]
  shutil.copytree(workdir, tmp_path / "suite")
  shutil.copytree(workdir / "kd", tmp_path / "suite" / "dkd" / "seed0")
  shutil.copytree(workdir / "kd", tmp_path / "suite" / "dkd" / "seed1")
  with pytest.raises(ValueError, match="several runs; pick one with run=, one of: "
                                       "dkd/seed0, dkd/seed1, kd"):
    kdjax.load_run(tmp_path / "suite")
  with pytest.raises(ValueError, match="run='dkd' ran over several seeds .* dkd/seed0, dkd/seed1"):
    kdjax.load_run(tmp_path / "suite", run="dkd")
  with pytest.raises(ValueError, match="no run 'nkd' .* its runs: dkd/seed0, dkd/seed1, kd"):
    kdjax.load_run(tmp_path / "suite", run="nkd")
  assert kdjax.load_run(tmp_path / "suite", run="dkd/seed1").config.method == "kd"
  with pytest.raises(FileNotFoundError, match="not a directory"):
    kdjax.load_run(tmp_path / "nowhere")


def readme_section_code() -> str:
  """The Python blocks of docs/bring_your_own.md's "Your own model and data" section (README
  links it), in order."""
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  with open(os.path.join(REPO, "docs", "bring_your_own.md")) as f:
    text = f.read()
  section = text.split("## Your own model and data\n", 1)[1].split("\n## ", 1)[0]
  return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


@pytest.mark.slow
def test_readme_bring_your_own_runs_as_written(tmp_path):
  """The section's code, verbatim, as one script in an empty directory."""
  from conftest import run_python  # pylint: disable=import-outside-toplevel
  script = tmp_path / "byo.py"
  script.write_text(readme_section_code())
  result = run_python([str(script)], cwd=str(tmp_path))
  lines = result.stdout.strip().splitlines()
  accuracy = ast.literal_eval(lines[-2])  # The printed {run: eval accuracy}.
  assert accuracy["teacher"] >= 0.9 and accuracy["kd"] > accuracy["scratch"], accuracy
  student = float(lines[-1].split(":")[1])
  assert student == pytest.approx(accuracy["kd"], abs=1e-3), (student, accuracy)
  with open(tmp_path / "runs" / "byo" / "summary.json") as f:
    assert json.load(f)["provenance"]["datasets"]["mnist1d_arrays/train"]["examples"] == 4000


_CLI_MODULE = '''
import numpy as np
from flax import nnx
from kdjax import data, models


class Linear(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.head = nnx.Linear(40, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.head(x)


models.register("byo_cli_linear", Linear, input_kind="signal1d")
rng = np.random.default_rng(0)
centres = rng.normal(size=(10, 40)) * 3
labels = rng.integers(0, 10, size=600)
inputs = (centres[labels] + rng.normal(size=(600, 40))).astype(np.float32)
data.register_arrays("byo_cli_data", train=(inputs[:400], labels[:400]),
                     eval=(inputs[400:], labels[400:]), num_classes=10, input_kind="signal1d")
'''


@pytest.mark.slow
def test_cli_register_imports_a_user_module(tmp_path):
  """`experiments.main --register=module` trains a registered model on registered arrays; an
  unknown module is a one-line error."""
  from conftest import REPO, run_python  # pylint: disable=import-outside-toplevel
  (tmp_path / "byo_cli.py").write_text(_CLI_MODULE)
  common_args = ["-m", "experiments.main", f"--config={REPO}/configs/quickstart.py:smoke",
                 "--workdir=runs/cli", "--config.suite=teacher,kd",
                 "--config.dataset=byo_cli_data", "--config.student.model=byo_cli_linear"]
  missing = run_python(common_args + ["--register=byo_nowhere"], cwd=str(tmp_path), check=False)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
  assert "Error: --register=byo_nowhere: no module 'byo_nowhere'" in missing.stderr
  run_python(common_args + ["--register=byo_cli"], cwd=str(tmp_path))
  with open(tmp_path / "runs" / "cli" / "summary.json") as f:
    runs = json.load(f)["runs"]
  assert runs["kd"]["student"] == "byo_cli_linear" and runs["kd"]["eval_accuracy"] > 0.5, runs
