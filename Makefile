# Developer entry points of the KeyMorph bundle. The repository root is the bundle root.
#
#   make venv     create .venv from requirements-dev.txt (re-runs when a requirements file changes)
#   make demo     register the demo images (or DEMO_INPUT=...) with configs/inference.yaml
#   make test     run the unit tests
#   make lint     check formatting (black, isort) and style (flake8)
#   make format   apply black and isort
#   make package  build the release archive (scripts/package.py)
#   make clean    remove caches and generated files (keeps .venv; `make distclean` removes it too)

# Interpreter used only to create the virtual environment; everything else runs from .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Configs import `scripts.*` during `initialize`, before the runner adds the bundle root to sys.path.
export PYTHONPATH := $(CURDIR)

# Folders that lint/format look at; folders that do not exist (yet) are skipped.
CODE_DIRS := $(wildcard scripts tests benchmarks)

# The demo prepares DEMO_INPUT itself unless the caller points it at a folder of their own.
DEMO_DEFAULT_INPUT := demo/input
DEMO_INPUT ?= $(DEMO_DEFAULT_INPUT)
DEMO_OUTPUT ?= demo/output
# Config ID the runner executes (`python -m monai.bundle run <RUN_ID>`).
RUN_ID ?= inference

PYTEST_ARGS ?=

.PHONY: venv demo test lint format package clean distclean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@

demo: venv
ifeq ($(DEMO_INPUT),$(DEMO_DEFAULT_INPUT))
	$(BIN)/python -m scripts.demo_data --output_dir $(DEMO_INPUT)
endif
	$(BIN)/python -m monai.bundle run $(RUN_ID) --config_file configs/inference.yaml \
		--dataset_dir $(DEMO_INPUT) --output_dir $(DEMO_OUTPUT)
	@echo "Demo inputs:  $(abspath $(DEMO_INPUT))"
	@echo "Demo outputs: $(abspath $(DEMO_OUTPUT))"

# pytest exits 5 when it collects no test: that is a failure here, said out loud.
test: venv
	@rc=0; $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

lint: venv
	$(BIN)/black --check -l 120 --skip-magic-trailing-comma $(CODE_DIRS)
	$(BIN)/isort --check --profile black -l 120 $(CODE_DIRS)
	$(BIN)/flake8 $(CODE_DIRS)

format: venv
	$(BIN)/black -l 120 --skip-magic-trailing-comma $(CODE_DIRS)
	$(BIN)/isort --profile black -l 120 $(CODE_DIRS)

package: venv
	$(BIN)/python -m scripts.package

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis demo
	rm -f models/model.ts models/verify_model.ts eval/schema.json requirements_*.txt

distclean: clean
	rm -rf $(VENV)
