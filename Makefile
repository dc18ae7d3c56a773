# Two commands set everything up on a fresh machine:
#   make demo   install into .venv, then run the whole job on built-in sample images
#   make test   install into .venv (with test extras), then run the test suite
# CPU installs pin torch==2.13.0 (constraints.txt). With a GPU, install the CUDA build of
# torch into the venv first (see README); the pin is then satisfied or can be dropped.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test processes: the suite spends much of its time waiting (Ray starting, processes killed
# and restarted, S3 retries backing off), so two processes on a 2-core machine halve it.
# A test file stays in one process (its module fixtures, e.g. one Ray job, run once).
TEST_WORKERS ?= 2

.PHONY: demo test test-portability install clean

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
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The numeric tests again on other float paths (no expectation may hold a float one CPU made):
# torch's generic kernels, AVX2 instead of AVX-512, and one thread (other reduction orders).
NUMERIC_TESTS ?= tests/conformance tests/test_ensemble.py tests/test_ensemble_diffusers.py tests/test_tiling.py \
	tests/test_tiling_joint.py tests/test_engine.py tests/test_predict_inputs.py tests/test_metrics.py \
	tests/test_quality.py tests/test_job.py tests/test_model_kinds.py tests/test_tiling_budget.py \
	tests/test_metric_align.py tests/test_metric_reference.py tests/test_metric_views.py
test-portability: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
