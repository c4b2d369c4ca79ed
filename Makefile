# Two commands for a fresh machine (see README.md):
#   make demo   - create .venv, make a synthetic dataset, train a small model locally (no AWS, no Docker)
#   make test   - create .venv and run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[train,serve,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unetseg demo --output demo

test: $(STAMP)
	SAGEMAKER_SUPPRESS_V2_WARNING=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	cd bench && ../$(VENV)/bin/python data_pipeline.py && ../$(VENV)/bin/python train_step.py

clean:
	rm -rf $(VENV) demo runs *.egg-info
