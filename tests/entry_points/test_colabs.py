"""Every notebook in colabs/ runs top to bottom on CPU and leaves nothing outside its workdir."""

import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
# Seconds each took in this test on the 2-core machine (busy with other work; quiet is faster).
# The two quick ones run in the default suite; the others train suites of their own and run
# with the slow tests.
MEASURED_SECONDS = {"losses.ipynb": 28, "quickstart.ipynb": 69, "custom_method.ipynb": 72,
                    "inspect_teacher_student.ipynb": 76, "feature_distillation.ipynb": 105,
                    "bring_your_own.ipynb": 61, "llm_distillation.ipynb": 393,
                    "diffusion_distillation.ipynb": 227}
FAST = ("losses.ipynb", "quickstart.ipynb")


def _params():
  for path in NOTEBOOKS:
    name = os.path.basename(path)
    yield pytest.param(path, id=name, marks=() if name in FAST else (pytest.mark.slow,))


def _entries(directory):
  return set(os.listdir(directory))


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path, data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_DATA_DIR", data_dir)
  monkeypatch.setenv("KDJAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  notebook = nbformat.read(path, as_version=4)
  assert not [cell for cell in notebook.cells if cell.get("outputs")], "outputs in git"
  before = {d: _entries(d) for d in (REPO, os.path.join(REPO, "colabs"))}
  start = time.perf_counter()
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  print(f"{os.path.basename(path)}: {time.perf_counter() - start:.0f} s")
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  for directory, entries in before.items():  # Runs, plots, data: all under the workdir.
    assert not _entries(directory) - entries - {"__pycache__", ".pytest_cache"}, directory
  if "write_report" in "".join(c.source for c in notebook.cells):
    assert os.path.exists(tmp_path / "results.png")
  # The first code cell installs kdjax where it is not importable, the same in every notebook.
  first = next(c for c in notebook.cells if c.cell_type == "code")
  assert first.source.startswith("# Makes kdjax importable.") and "pip" in first.source


def test_there_is_a_notebook():
  assert NOTEBOOKS
  assert set(MEASURED_SECONDS) == {os.path.basename(p) for p in NOTEBOOKS}
