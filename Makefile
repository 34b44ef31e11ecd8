# Two commands do all the set-up on a fresh machine (see README):
#   make demo   -- install into .venv, then run the main job on the built-in example
#   make test   -- install into .venv, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/reproduce

.PHONY: install demo test lint test-slow bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dora-reproduce --out $(OUT)

# The guard rails first (seconds), then the suite.
test: lint
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dora_analysis tests benchmarks
	$(VENV)/bin/ruff format --check dora_analysis tests benchmarks
	$(VENV)/bin/lint-imports

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
