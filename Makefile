# Two entry points for a fresh clone; each sets up its own virtual environment from pyproject.toml.
#   make demo   train + evaluate a small RetinaNet on the built-in synthetic dataset (2 CPU cores: 5-7 min)
#   make test   the test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# XLA's CPU runtime allocates a call's temporaries anew and frees them after (1.3 GB a step for
# R50-FPN at 2 x 512 x 640), so on 4 KiB pages every step page-faults its whole working set again:
# ~370k faults, 10-12% of that step on the project's VMs. glibc's malloc puts its large blocks on
# transparent huge pages with this tunable (THP's default `madvise` mode), 2 MiB per fault. It is read
# at process start only, hence here and not in the package; a value the user has set wins.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

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
