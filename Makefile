# Developer entry points of the KeyMorph bundle. The repository root is the bundle root.
#
#   make venv     create .venv from requirements-dev.txt (re-runs when a requirements file changes)
#   make demo     register the demo images (or DEMO_INPUT=...) with configs/inference.yaml
#   make test     run the unit tests
#   make lint     check formatting (black, isort) and style (flake8)
#   make format   apply black and isort
#   make verify   the model zoo's checks: weights hash, metadata schema, network in/out, TorchScript export
#   make package  build the release zip dist/<name>_v<version>.zip (scripts/package.py; checks the weights hash)
#   make qc-screenshot  register the demo images and render their QC page in headless Chromium: docs/qc_index.png
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

.PHONY: venv demo test lint format verify package qc-screenshot clean distclean

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

# The demo's QC page (OUT/index.html) as a browser shows it, for the docs: needs the Debian package chromium.
qc-screenshot: venv
	$(BIN)/python -m scripts.demo_data --output_dir $(DEMO_DEFAULT_INPUT)
	$(BIN)/python -m scripts.register $(DEMO_DEFAULT_INPUT) -o $(DEMO_OUTPUT)
	$(BIN)/python -m scripts.qc_report $(DEMO_OUTPUT)/index.html docs/qc_index.png --width 1500 --height 700

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

# The zoo's checks on this bundle (its ci/verify_bundle.py, with the offline schema copy). ckpt_export scripts
# network_def (no tracing) with the weights into models/model.ts (gitignored; `make clean` removes it).
SCHEMA_COPY := tests/data/meta_schema_20240725.json
SCHEMA_MD5 := 06954cad2cc5d3784e72077ac76f0fc8
BUNDLE_CHECK_ARGS := --config_file configs/inference.yaml --meta_file configs/metadata.json

verify: venv
	$(BIN)/python -m scripts.hashes verify
	$(BIN)/python -m monai.bundle verify_metadata --meta_file configs/metadata.json \
		--filepath $(SCHEMA_COPY) --hash_val $(SCHEMA_MD5) --hash_type md5
	$(BIN)/python -m monai.bundle verify_net_in_out network_def $(BUNDLE_CHECK_ARGS) --device cpu
	$(BIN)/python -m monai.bundle ckpt_export network_def --filepath models/model.ts \
		--ckpt_file models/model.pt $(BUNDLE_CHECK_ARGS)

# Release zip: dist/<bundle_name>_v<version>.zip, refused when models/model.pt does not match large_files.yml.
DIST ?= dist

package: venv
	$(BIN)/python -m scripts.package --output_dir $(DIST)

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis demo dist
	rm -f models/model.ts models/verify_model.ts eval/schema.json requirements_*.txt

distclean: clean
	rm -rf $(VENV)
