"""The documentation site builds without a single warning (the command of ``make docs``)."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _sphinx_opts() -> list[str]:
    """``SPHINXOPTS`` of the Makefile, so the test builds exactly as ``make docs`` does."""
    match = re.search(r"^SPHINXOPTS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no 'SPHINXOPTS ?= ...' line"
    opts = shlex.split(match.group(1))
    assert "-W" in opts, "the docs build must treat warnings as errors"
    return opts


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # as `make docs`: execute the notebooks first (myst-nb renders the stored outputs)
    nb = subprocess.run([sys.executable, str(DOCS / "build_notebooks.py")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
    assert nb.returncode == 0, f"docs/build_notebooks.py failed:\n{(nb.stdout + nb.stderr)[-20000:]}"
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", *_sphinx_opts(), "-q", str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sphinx-build failed ({proc.returncode}):\n{log[-20000:]}"
    assert "WARNING" not in log and "ERROR" not in log, log[-20000:]
    return out


@pytest.mark.slow
def test_index_links_the_guide_examples_and_api(site):
    html = (site / "index.html").read_text()
    assert "brainenc" in html
    for page in ("examples.html", "architecture.html", "pipelines.html", "ridge.html", "api/index.html"):
        assert f'href="{page}' in html, page
    api = (site / "api" / "index.html").read_text()
    assert "generated/brainenc.encoding.html" in api and "brainenc.load" in api


@pytest.mark.slow
def test_encoding_api_page_documents_ridge_encoder(site):
    html = (site / "api" / "generated" / "brainenc.encoding.html").read_text()
    assert 'id="brainenc.encoding.RidgeEncoder"' in html
    assert "alpha_per_target" in html and "standardize" in html  # documented parameters
    assert "best_alphas_" in html  # a documented attribute
    assert 'id="brainenc.encoding.RidgeEncoder.save_pretrained"' in html  # inherited from EstimatorMixin
    assert "set_fit_request" not in html  # scikit-learn's generated methods are hidden
    assert "&lt;factory&gt;" not in (site / "api" / "generated" / "brainenc.features.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("pkg", ["datasets", "features", "encoding", "models", "ops", "training", "metrics",
                                 "report", "workflows", "estimator", "config", "synthesis", "decoding"])
def test_every_exported_name_is_documented(site, pkg):
    html = (site / "api" / "generated" / f"brainenc.{pkg}.html").read_text()
    module = importlib.import_module(f"brainenc.{pkg}")
    missing = [name for name in module.__all__ if f'id="brainenc.{pkg}.{name}"' not in html]
    assert not missing, f"brainenc.{pkg}: {missing} exported but not on its API page"


@pytest.mark.slow
def test_examples_page_shows_the_commands(site):
    html = (site / "examples.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)  # highlighted code is split into <span>s
    for phrase in ("brainenc simulate", "brainenc run quickstart", "brainenc.load", "read_stage_record"):
        assert phrase in text, phrase


@pytest.mark.slow
def test_notebook_page_shows_its_outputs(site):
    html = (site / "notebooks" / "roi_analysis.html").read_text()
    assert "ROI analysis of a finished run" in html
    assert html.count("<img") >= 5  # the figures the notebook drew
    assert "matches scores/routing/r.npy" in html  # a printed, self-checked output
    index = (site / "index.html").read_text()
    assert 'href="notebooks/roi_analysis.html"' in index
