# Two entry points that work on a fresh machine: `make test` and `make demo`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo venv bench clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned (CPU build); anything depending on it then finds it satisfied.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP)

# Two workers (CI has 2 cores); tests/conftest.py makes each test file one unit of work.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

# The inner loop: everything but the tests marked slow (the trained tiny base, whole experiments).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m launch.demo --workdir=$(or $(WORKDIR),runs/demo)

bench: $(STAMP)
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train_step.py --write

clean:
	rm -rf $(VENV) runs
