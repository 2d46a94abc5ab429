# The newcomer's two commands are `make demo` and `make test`; both install first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo serve test test-slow test-faults test-gpu lint protos

# torch is installed alone first, pinned, so pip takes the CPU build of this release
# instead of resolving an open range to the newest CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recfunnel demo

serve: $(STAMP)
	$(BIN)/recfunnel demo --serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy protos retrieval ranking gateway cluster recdata bench

protos: $(STAMP)
	$(BIN)/python -m protos.generate

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m protos.generate --check
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-faults: $(STAMP)
	$(BIN)/python -m pytest -m fault

# The CUDA tests (training and Ray Train workers on a GPU); skipped where torch sees none.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu
