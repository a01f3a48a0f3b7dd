# Two commands on a fresh machine: `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-all venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'projectaria-tools>=2.3'
	touch $@

venv: $(BIN)/.installed

## make demo: generate the sample Ego4D tree, prepare it into a store and summarise it
demo: venv
	@echo "== 1/4 generating the sample Ego4D tree in $(DEMO_DIR)/ego4d"
	rm -rf $(DEMO_DIR)/ego4d
	$(BIN)/mmloader sample ego4d $(DEMO_DIR)/ego4d --videos 8 --seconds 60 --seed 0
	@echo "== 2/4 preparing the store $(DEMO_DIR)/store"
	$(BIN)/mmloader prepare ego4d $(DEMO_DIR)/ego4d $(DEMO_DIR)/store --overwrite
	@echo "== 3/4 the store"
	$(BIN)/mmloader info $(DEMO_DIR)/store
	$(BIN)/mmloader validate $(DEMO_DIR)/store
	@echo "== 4/4 5-second IMU+video windows, one epoch through the loader"
	$(BIN)/mmloader windows $(DEMO_DIR)/store --sec 5 --modalities imu video text --frames 4 --size 112 112 --workers 1

## make test: the test suite (slow tests excluded; `make test-all` runs them too)
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
