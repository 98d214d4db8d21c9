# raymesh: `make demo` runs the demo mesh, `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test unit integration bench install build clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Compiles the proxy's request path (setup.py) in place; only modules whose .py or .pxd
# changed are rebuilt, so after an edit this is what brings the compiled modules up to date.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

demo: build
	$(PY) -m actors.demo

# The suite runs on the compiled proxy; the unit tests then run again on its pure-Python
# modules, which is what a machine without a C compiler gets.
test: build
	$(PY) -m pytest -q
	RAYMESH_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

unit: build
	$(PY) -m pytest -q tests/unit tests/conformance

integration: build
	$(PY) -m pytest -q tests/integration

bench: build
	$(PY) benchmarks/proxy_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache proxy_core/*.c proxy_core/*.so
