# Offline assets; override with `make test MODEL_ROOT=... GLUE_DIR=...` or the environment.
MODEL_ROOT ?= $(or $(JAXCOMPRESS_MODEL_ROOT),$(abspath ../shared/models))
GLUE_DIR ?= $(or $(JAXCOMPRESS_GLUE_DIR),$(abspath ../shared/data/glue))
PYTHON ?= python
# pytest processes; each holds up to ~5 GiB while the suite runs
TEST_WORKERS ?= 2
export JAXCOMPRESS_MODEL_ROOT := $(MODEL_ROOT)
export JAXCOMPRESS_GLUE_DIR := $(GLUE_DIR)

.PHONY: install install-test test quick tables

# Also writes jaxcompress.toml (if absent) with the asset folders that exist, so that every
# jaxcompress command run in this checkout finds them without exported variables.
install:
	$(PYTHON) -m pip install -q -e .
	@if [ ! -e jaxcompress.toml ]; then \
		{ [ ! -d "$(MODEL_ROOT)" ] || echo "model_root = '$(MODEL_ROOT)'"; \
		  [ ! -d "$(GLUE_DIR)" ] || echo "glue_dir = '$(GLUE_DIR)'"; } > jaxcompress.toml; \
		echo "wrote jaxcompress.toml:"; cat jaxcompress.toml; fi

# torch first, pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
install-test:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

test: install-test
	ruff format --check .
	ruff check .
	shellcheck tpu_scripts/*.sh
	$(PYTHON) -m pytest -q -p no:benchmark -n $(TEST_WORKERS) --dist worksteal --durations=10 -m "not devices8"
	# Alone: 8 simulated devices' collectives can miss each other on a CPU that other tests load.
	$(PYTHON) -m pytest -q -p no:benchmark --durations=2 -m devices8

# The main job: a compression recipe in quick mode (distil the MiniLM SST-2 teacher into a
# 3-layer student for 100 steps, evaluate both on the full dev set), ending in a results table.
quick: install
	jaxcompress recipe --config configs/recipes/sst2.py:distil_l3,quick --workdir runs/quick_recipe

tables:
	$(PYTHON) benchmarks/tables.py --write docs/results.md README.md
