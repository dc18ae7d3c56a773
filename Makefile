# Two commands set everything up on a fresh machine:
#   make demo   install into .venv, then run the whole job on built-in sample images
#   make test   install into .venv (with test extras), then run the test suite
# CPU installs pin torch==2.13.0 (constraints.txt). With a GPU, install the CUDA build of
# torch into the venv first (see README); the pin is then satisfied or can be dropped.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/depthray demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
