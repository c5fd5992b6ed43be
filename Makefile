# Two entry points for a fresh clone; each sets up its own virtual environment from pyproject.toml.
#   make demo   train + evaluate a small RetinaNet on the built-in synthetic dataset (2 CPU cores: 5-7 min)
#   make test   the test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) -m retina_jax.main --config configs/shapes.py --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=15 tests
