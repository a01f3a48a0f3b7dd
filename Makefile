# Two commands on a fresh machine: `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 80
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-all venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'projectaria-tools>=2.3'
	touch $@

venv: $(BIN)/.installed

## make demo: the whole mission on the built-in sample data: generate the sample Ego4D tree, prepare a store,
## check it, load windows through the loader, then cache CLIP embeddings, train IMU2CLIP and evaluate it
demo: venv
	@echo "== mmloader: sample data -> store -> windows"
	rm -rf $(DEMO_DIR)/ego4d-small
	$(BIN)/mmloader sample ego4d $(DEMO_DIR)/ego4d-small --videos 4 --seconds 30 --seed 0
	$(BIN)/mmloader prepare ego4d $(DEMO_DIR)/ego4d-small $(DEMO_DIR)/store-small --overwrite
	$(BIN)/mmloader info $(DEMO_DIR)/store-small
	$(BIN)/mmloader validate $(DEMO_DIR)/store-small
	$(BIN)/mmloader windows $(DEMO_DIR)/store-small --sec 5 --modalities imu video text --frames 4 --size 112 112 --workers 1
	@echo "== imu2clip_plugin: embedding cache -> training -> evaluation"
	$(BIN)/python -m imu2clip_plugin.demo --run-dir $(DEMO_DIR) --epochs $(DEMO_EPOCHS)

## make test: the test suite (slow tests excluded; `make test-all` runs them too)
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
