# keras_cspine: the commands that do all set-up from a bare clone.
#   make demo   creates .venv, installs everything, runs the demo on the synthetic default
#   make test   creates .venv, installs everything, runs the whole test suite (slow ones too)
#   make notebooks  runs the four notebooks on the synthetic default and saves them with outputs
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench install clean notebooks

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m keras_cspine demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

notebooks: $(STAMP)
	$(PY) notebooks/make_notebooks.py --execute

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_gcvit.py
	$(PY) benchmarks/bench_generator.py
	$(PY) benchmarks/bench_detect.py
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info runs
