# `make serve` and `make test` each set up everything on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
# CPU torch is installed before NeMo so pip does not pull the multi-GB CUDA build.
# On a GPU host run `make TORCH=skip ...` with a CUDA torch already in the venv/base image.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test setup system-deps lint typecheck demo-model fidelity bench bench-gpu bench-batching bench-health bench-durability bench-scaleout clean

serve: setup
	$(BIN)/aiotranscribe serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: system-deps $(VENV)/.installed

# ffmpeg decodes uploads; espeak-ng and sox make the tests' speech; chromium runs the UI tests;
# redis-server backs --store redis:// in its tests (each tool's Debian package has its name).
SYSTEM_TOOLS := ffmpeg espeak-ng sox chromium redis-server
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ "$(TORCH)" != skip ]; then $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(BIN)/ruff check aiotranscribe tests tools
	$(BIN)/ruff format --check aiotranscribe tests tools
	$(BIN)/mypy

demo-model: setup
	$(BIN)/python tools/train_demo_model.py --out aiotranscribe/models/demo.nemo

# The fidelity table: the test's 60-utterance sample, then 300 other held-out utterances.
fidelity: setup
	$(BIN)/python -m tests.fidelity --write docs/fidelity.md
	$(BIN)/python -m tests.fidelity --seed 99 --utterances 300 --append docs/fidelity.md

# Issue 13's P1-P5 table (about 10 minutes on 2 cores; builds and caches the benchmark model
# and audio under .cache/ on first use) into docs/benchmarks.md. BENCH_ARGS='--reps 5' etc.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# On a host with an NVIDIA GPU and a CUDA torch in the venv (make setup TORCH=skip).
bench-gpu:
	bash benchmarks/gpu.sh $(BENCH_ARGS)

# Batching choices through the real pool, side by side (about 15 minutes on 2 cores).
bench-batching: setup
	$(BIN)/python benchmarks/batching.py --workers-experiment 2 $(BENCH_ARGS)

bench-health: setup
	$(BIN)/python benchmarks/health_latency.py

# kill -9 cycles (every accepted job completes once) and SQLite's cost against memory.
bench-durability: setup
	$(BIN)/python benchmarks/durability.py

# 2 --no-workers replicas + 2 workers on a private Redis (1 and 2 batches out per replica)
# against one serve, same files and model; about 4 minutes on 2 cores. BENCH_ARGS='--reps 5'.
bench-scaleout: setup
	$(BIN)/python benchmarks/scaleout.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) spool data .pytest_cache .mypy_cache .ruff_cache
