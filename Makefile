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

# pip compiles every installed file to bytecode one at a time; compileall does the same on every core. The
# bytecode must exist: where PYTHONDONTWRITEBYTECODE is set (as on this project's build machines) nothing writes
# it later, and each process would compile torch, diffusers and Ray again (2.4x the import time of every Ray
# worker). One file of torch's test helpers is Python 3.12 syntax and fails to compile, as it does under pip:
# compileall's status is ignored.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip
	$(BIN)/pip install -q --no-compile "$(TORCH)"
	$(BIN)/pip install -q --no-compile -e ".[test]"
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/exvideo demo

# Headless Chromium for the report screenshot test; installed only when missing.
system-deps:
	bash scripts/system_deps.sh

# The project's own modules are compiled first for the same reason (every Ray worker imports them).
test: $(STAMP) system-deps
	$(BIN)/python -m compileall -q -j 0 exvideo preprocessing pipelines orchestration experiments benchmarks > /dev/null
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
