# cellseg: `make demo` and `make test` are the two commands; both run `make setup` first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch on this machine; GPU users: make setup TORCH=torch (CUDA build from PyPI),
# other CPU machines: make setup TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist; a file's tests stay in one process, with its
# servers and fixtures): most of the slow tests wait on servers and schedules, so 2 suit 2 cores;
# tests/conftest.py gives each its share of the cores' torch threads.
TEST_WORKERS ?= 2

export DO_NOT_TRACK := 1
export PREFECT_LOGGING_EXTRA_LOGGERS := cellseg
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW := ignore

.PHONY: setup demo lint test bench bench-large bundled-model nuclei-model clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# The demo runs the pipeline through the Prefect flows on Prefect's ephemeral local API.
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/cellseg synth --out $(DEMO_DIR)/data --count 40 --size 128 --seed 0
	$(BIN)/cellseg synth --out $(DEMO_DIR)/new --count 8 --size 160 --seed 1 --vary-size
	$(BIN)/cellseg flow train-unet --images $(DEMO_DIR)/data/images --masks $(DEMO_DIR)/data/masks \
		--registry $(DEMO_DIR)/registry --cache-dir $(DEMO_DIR)/cache --work-dir $(DEMO_DIR)/training \
		--training-json '{"epochs": 12, "patch_size": 128, "patches_per_image": 2, "max_minutes": 3}'
	$(BIN)/cellseg flow segment-images --source $(DEMO_DIR)/new/images --store $(DEMO_DIR)/results.zarr \
		--registry $(DEMO_DIR)/registry --shard-size 3
	$(BIN)/cellseg results $(DEMO_DIR)/results.zarr --limit 5
	$(BIN)/cellseg evaluate --pred $(DEMO_DIR)/results.zarr --masks $(DEMO_DIR)/new/masks
	@echo
	@echo "outputs:"
	@echo "  training data     $(DEMO_DIR)/data"
	@echo "  model registry    $(DEMO_DIR)/registry   (cellseg models list --registry $(DEMO_DIR)/registry)"
	@echo "  masks + stats     $(DEMO_DIR)/results.zarr   (cellseg results $(DEMO_DIR)/results.zarr)"

# Lint and type checks (ruff.toml, mypy.ini, .importlinter); `make test` runs them first.
lint: setup
	$(BIN)/ruff check cellseg flows deployments benchmarks tests
	$(BIN)/mypy cellseg
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Performance figures, side by side in one run (14-28 minutes on 2 cores); not part of `make test`.
bench: setup
	$(BIN)/python -m benchmarks.run

# Images bigger than memory (docs/performance.md): a 30000x30000 mosaic block by block (peak RSS,
# throughput vs separate 512x512 images) and the seams of an 8192x8192 one; tens of minutes on 2 cores.
bench-large: setup
	$(BIN)/python -m benchmarks.large

# Retrain the model shipped in cellseg/models/ (synthetic data only; about 12 minutes on 2 cores).
bundled-model: setup
	$(BIN)/python -m cellseg.build_bundled general --install

clean:
	rm -rf $(VENV) runs .pytest_cache

# Retrain the nuclei model shipped in cellseg/models/ on ../shared/data/dsb2018-train (hours on 2 CPU
# cores; resumable: run it again after an interruption), then score it on the dsb2018 test set.
nuclei-model: setup
	$(BIN)/python -m cellseg.build_bundled nuclei --resume --install
