# The README's two commands: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.brainenc-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/brainenc simulate
	$(BIN)/brainenc run pipelines/quickstart.toml --subject subj01

# TRITON_INTERPRET must be set before anything imports triton (see tests/conftest.py).
test: $(STAMP)
	TRITON_INTERPRET=1 BRAINENC_QUIET=1 $(BIN)/python -m pytest -n 2 --timeout=900 -q
	$(BIN)/lint-imports

test-fast: $(STAMP)
	TRITON_INTERPRET=1 BRAINENC_QUIET=1 $(BIN)/python -m pytest -n 2 -q -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
