# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse the project virtualenv, install the pinned stack, build the extension.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv build test run
# The hub `kernels` package, whose import name ours must not take: tests/test_packaging.py installs our
# wheel beside this one (skipped where it cannot be downloaded).
HUB_KERNELS := kernels==0.17.2

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone: the CPU build on local disk (see requirements.txt)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# The C++ extension builds against the installed torch (CUDA sources only where torch has CUDA and
# nvcc is found); scikit-build-core keeps build/ so a rebuild is incremental.
build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

$(VENV)/hub-wheels/.done: | venv
	-$(PIP) download -q --no-deps --only-binary=:all: -d $(VENV)/hub-wheels $(HUB_KERNELS) && touch $@

# -P keeps the checkout's root off sys.path: the tests import the installed rlhf_kernels / rlhf_engine.
test: build $(VENV)/hub-wheels/.done
	$(PY) -P -m pytest -q tests

run: build
	$(PY) -m bench logprobs --quick
