# Two commands do all the set-up on a fresh machine:
#   make demo   # the main job: cross-platform transfer ML-1M -> ML-100K, the whole pipeline, CPU
#   make test   # the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
# Elsewhere, e.g.: make setup TORCH_CPU_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUN_DIR ?= runs/ml_cross_platform
# Fine-tuning steps run side by side, each with 1/DEMO_JOBS of the cores (crossrec experiment --jobs).
DEMO_JOBS ?= 2

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e '.[onnx,serve,test]'
else
	$(PY) -m pip install -q $(TORCH_CPU_SPEC)
	$(PY) -m pip install -q -e '.[onnx,serve,test]'
endif
	touch $@

demo: setup
	$(VENV)/bin/crossrec experiment --config launch/recipes/ml_cross_platform.yaml --out $(RUN_DIR) --jobs $(DEMO_JOBS)

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	DS_ACCELERATOR=cpu $(PY) -m benchmarks.run_all --tier $(or $(TIER),quick)

clean:
	rm -rf $(VENV) runs
