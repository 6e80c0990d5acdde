"""Every notebook runs top to bottom in a fresh kernel; their asserts check what they teach against the library."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
nbformat = pytest.importorskip("nbformat", reason="running the notebooks needs nbformat (pip install -e .[dev])")
nbclient = pytest.importorskip("nbclient", reason="running the notebooks needs nbclient (pip install -e .[dev])")
pytest.importorskip("ipykernel", reason="running the notebooks needs ipykernel (pip install -e .[dev])")
pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib (pip install -e .[dev])")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
