# Offline assets; override with `make test MODEL_ROOT=... GLUE_DIR=...` or the environment.
MODEL_ROOT ?= $(or $(JAXCOMPRESS_MODEL_ROOT),$(abspath ../shared/models))
GLUE_DIR ?= $(or $(JAXCOMPRESS_GLUE_DIR),$(abspath ../shared/data/glue))
PYTHON ?= python
export JAXCOMPRESS_MODEL_ROOT := $(MODEL_ROOT)
export JAXCOMPRESS_GLUE_DIR := $(GLUE_DIR)

.PHONY: install install-test test quick tables

install:
	$(PYTHON) -m pip install -q -e .

# torch first, pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
install-test:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

test: install-test
	ruff format --check .
	ruff check .
	$(PYTHON) -m pytest -q

# The main job: fine-tune the MiniLM teacher on SST-2 in quick mode, then a results table.
quick: install
	jaxcompress finetune --config configs/finetune.py:sst2,quick --workdir runs/quick_sst2

tables:
	$(PYTHON) benchmarks/tables.py --write README.md
