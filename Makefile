# cellseg: `make demo` and `make test` are the two commands; both run `make setup` first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch on this machine; GPU users: make setup TORCH=torch (CUDA build from PyPI),
# other CPU machines: make setup TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

export DO_NOT_TRACK := 1

.PHONY: setup demo test clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/cellseg synth --out $(DEMO_DIR)/data --count 40 --size 128 --seed 0
	$(BIN)/cellseg synth --out $(DEMO_DIR)/new --count 8 --size 160 --seed 1 --vary-size
	$(BIN)/cellseg train --images $(DEMO_DIR)/data/images --masks $(DEMO_DIR)/data/masks \
		--out $(DEMO_DIR)/model --epochs 12 --patch-size 128 --patches-per-image 2 --max-minutes 3
	$(BIN)/cellseg predict --model $(DEMO_DIR)/model/best.pt --images $(DEMO_DIR)/new/images \
		--out $(DEMO_DIR)/results.zarr
	$(BIN)/cellseg evaluate --pred $(DEMO_DIR)/results.zarr --masks $(DEMO_DIR)/new/masks
	@echo
	@echo "outputs:"
	@echo "  training data     $(DEMO_DIR)/data"
	@echo "  checkpoint        $(DEMO_DIR)/model/best.pt (history: $(DEMO_DIR)/model/history.json)"
	@echo "  masks + stats     $(DEMO_DIR)/results.zarr   (cellseg results $(DEMO_DIR)/results.zarr)"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
