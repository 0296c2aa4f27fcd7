"""Every notebook under notebooks/ runs top to bottom on a finished (tiny) run; the notebooks check
their own outputs with assertions, so a wrong number fails here, not only an exception."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))



def _tiny_spec_text(**kwargs) -> str:
    """The workflow tests' tiny spec (tests/workflows/conftest.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_wf_conftest", Path(__file__).parent / "workflows" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiny_spec_text(**kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from brainenc.workflows import run_pipeline

    tmp = tmp_path_factory.mktemp("nbrun")
    spec = tmp / "nbtiny.toml"
    spec.write_text(_tiny_spec_text(name="nbtiny", fits=("pooled", "routing"), epochs=2))
    return run_pipeline(spec, subject="subj01", data_dir=tmp / "data")


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
