# `make demo` and `make test` each create the environment on a fresh machine; nothing else to type.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean bench

$(STAMP): pyproject.toml constraints.txt examples/peftkit-ia3/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,hf,demo,quant,bench]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e examples/peftkit-ia3
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/peftkit demo

# two workers (pytest-xdist), each test file whole on one of them (module fixtures run once)
test: setup
	$(PY) -m ruff check peftkit plugins tests examples benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --dist loadfile

lint: setup
	$(PY) -m ruff check peftkit plugins tests examples benchmarks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) peftkit-demo

bench: setup
	$(PY) benchmarks/run.py
