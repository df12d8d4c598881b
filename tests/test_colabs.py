"""Every notebook in colabs/ runs top to bottom on CPU."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_DATA_DIR", data_dir)
  monkeypatch.setenv("KDJAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  if "run_suite" in "".join(c.source for c in notebook.cells):
    assert os.path.exists(tmp_path / "results.png")


def test_there_is_a_notebook():
  assert NOTEBOOKS
