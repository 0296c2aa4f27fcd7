"""Every notebook under notebooks/ runs top to bottom on a finished (tiny) run; the notebooks check
their own outputs with assertions, so a wrong number fails here, not only an exception."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from brainenc.workflows import run_pipeline

    tmp = tmp_path_factory.mktemp("nbrun")  # the docs site's notebook run (docs/build_notebooks.py)
    return run_pipeline(ROOT / "docs" / "notebook_run.toml", subject="subj01", data_dir=tmp / "data")


def test_every_notebook_is_listed():
    assert [p.name for p in NOTEBOOKS] == ["roi_analysis.py"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tiny_run, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    monkeypatch.setenv("BRAINENC_RUN", str(tiny_run))
    monkeypatch.setenv("BRAINENC_QUIET", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell (assertions included)
    nbformat.write(nb, tmp_path / f"{path.stem}.ipynb")
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for o in c.get("outputs", []))
    assert figures >= 5, f"{path.name}: {figures} figures drawn"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "matches scores/pooled/r.npy" in text and "matches scores/routing/r.npy" in text
