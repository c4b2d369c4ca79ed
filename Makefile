# Two commands for a fresh machine (see README.md):
#   make demo   - create .venv, make a synthetic dataset, train a small model locally (no AWS, no Docker)
#   make test   - create .venv and run the test suite
#   make test-fast - the edit loop: the tests not marked slow or docker (no process started, no model trained)
#   make lint   - ruff check (configured in pyproject.toml; CI runs it before the tests)
#   make gpu-check - on a GPU machine: prove the CUDA path in one run (bench/gpu_check.sh; GPU_CHECK_ARGS=--smoke on a CPU)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# A real MLflow tracking server for the tests, in a venv of its own: full mlflow 3.x needs gunicorn<27, our server 27.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
MLFLOW_SERVER_VERSION := 3.17.2

.PHONY: demo test test-fast lint bench gpu-check clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[train,serve,onnx,geo,mlflow,dev]'
	touch $(STAMP)

$(MLFLOW_STAMP):
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet 'mlflow==$(MLFLOW_SERVER_VERSION)'
	touch $(MLFLOW_STAMP)

demo: $(STAMP)
	$(VENV)/bin/unetseg demo --output demo

test: $(STAMP) $(MLFLOW_STAMP)
	SAGEMAKER_SUPPRESS_V2_WARNING=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	SAGEMAKER_SUPPRESS_V2_WARNING=1 $(VENV)/bin/python -m pytest -m 'not slow and not docker' $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	cd bench && ../$(VENV)/bin/python data_pipeline.py && ../$(VENV)/bin/python train_step.py

gpu-check: $(STAMP)
	PYTHON=$(VENV)/bin/python bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) demo runs *.egg-info
