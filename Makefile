# The README's two commands: `make demo` and `make test`. Both create .venv if it is missing.
# `make docs` builds the documentation site into docs/_build/html.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.brainenc-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Sphinx: warnings are errors (-W, after reporting them all: --keep-going), nitpicky cross-references
# (-n: every :class:/:func: reference and signature type must resolve; third-party types are listed
# in docs/conf.py's nitpick_ignore_regex, since the build is offline), fresh environment each time
# (-E: an incremental build would not repeat the warnings of unchanged pages). tests/test_docs.py
# runs sphinx-build with these same options.
SPHINXOPTS ?= -W --keep-going -n -E

.PHONY: venv demo test test-fast lint bench clean-venv docs docs-shots

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,docs]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/brainenc simulate
	$(BIN)/brainenc run pipelines/quickstart.toml --subject subj01

# TRITON_INTERPRET must be set before anything imports triton (see tests/conftest.py).
# The second pass reruns the fast tests on other numerics than the first (1 thread, the CPU's best
# ATen kernels): 2 intra-op / BLAS threads and ATen's portable non-SIMD kernels, so that a tolerance
# which only holds for one thread count or one ISA fails here rather than on a user's machine.
test: $(STAMP)
	TRITON_INTERPRET=1 BRAINENC_QUIET=1 $(BIN)/python -m pytest -n 2 --timeout=900 -q
	$(BIN)/lint-imports
	OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default TRITON_INTERPRET=1 BRAINENC_QUIET=1 \
		$(BIN)/python -m pytest -n 2 --timeout=900 -q -m "not slow"

test-fast: $(STAMP)
	TRITON_INTERPRET=1 BRAINENC_QUIET=1 $(BIN)/python -m pytest -n 2 -q -m "not slow"

docs: $(STAMP)
	$(BIN)/python docs/build_notebooks.py
	$(BIN)/sphinx-build -b html $(SPHINXOPTS) docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# Manual check (needs chromium; not part of CI): screenshots of key pages into docs/_build/shots.
docs-shots: docs
	bash docs/screenshot.sh docs/_build/html docs/_build/shots

lint: $(STAMP)
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
