# Everything a fresh machine needs: `make demo` (the main job) and `make test` (what CI runs;
# `make test-fast` for iterating).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= datasets/synth

.PHONY: demo test test-fast setup clean

setup: $(VENV)/.installed

# torch/torchvision are pinned in pyproject.toml; on the project's machines pip takes them from local disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# (without setuptools' warning, on every editable install, about folders named like packages)
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install -q -e '.[test]'
	touch $@

$(DATA)/captions.txt: | $(VENV)/.installed
	$(BIN)/captune data synth --out $(DATA)

# Main job: a sweep on the built-in dataset: both architectures, Ray Tune + Optuna (GP sampler) on
# validation BLEU-4 (METRIC=cider: CIDEr-D), every trial in MLflow (mlflow/mlflow.db); each
# search's TOP configurations retrained with SEEDS new seeds, the best mean registered as its
# champion and set against its image-blind control; then the champions compared.
SWEEP ?= demo-$(shell date +%Y%m%d-%H%M%S)
SWEEP_FILE ?= search/demo.yaml
SEEDS ?= 2
TOP ?= 2
METRIC ?= bleu4
demo: $(VENV)/.installed $(DATA)/captions.txt
	$(BIN)/captune data check $(DATA)
	$(BIN)/captune sweep --data $(DATA) --name $(SWEEP) --config $(SWEEP_FILE) --seeds $(SEEDS) --top $(TOP) --metric $(METRIC)

# The whole suite (what CI runs); every test's seconds land in runs/test-durations.json.
test: $(VENV)/.installed
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q

# For iterating: the tests that need no Ray cluster, sweep or server (tests/conftest.py marks the rest slow).
test-fast: $(VENV)/.installed
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs $(DATA)
