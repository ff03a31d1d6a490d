# Two commands, each creating the environment first when it is missing:
#   make train [ARGS="--preset tiny --max_steps=20"]   the main job: jaxrm train
#   make test  [ARGS="-k parity"]                       ruff, then the tests
VENV ?= .venv
PYTHON := $(VENV)/bin/python
READY := $(VENV)/.installed

.PHONY: train test lint format

train: $(READY)
	$(VENV)/bin/jaxrm train $(ARGS)

test: lint
	$(PYTHON) -m pytest -q $(ARGS)

lint: $(READY)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(READY)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# torch's CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
$(READY): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[torch,dev]"
	touch $@
