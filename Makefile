# Two entry points: `make demo` (the main job on embedded defaults) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this kind of machine keeps on disk. GPU machines: make setup TORCH='torch>=2.4,<3'
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/exvideo demo

# Headless Chromium for the report screenshot test; installed only when missing.
system-deps:
	bash scripts/system_deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
