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

# Python writes each module's bytecode the first time a process imports it, and every later process loads it from
# there. This project's build machines turn that off (PYTHONDONTWRITEBYTECODE): without bytecode, every Ray worker
# would compile torch, diffusers and Ray again (2.4x its import time). Turned back on here for every recipe, rather
# than compiling all of site-packages ahead (pip's default, hence --no-compile), since the project imports a fifth of
# its 22,000 modules.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip
	$(BIN)/pip install -q --no-compile "$(TORCH)"
	$(BIN)/pip install -q --no-compile -e ".[test]"
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
