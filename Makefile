# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on a fresh machine with only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,langchain,mcp,serve,web,constrained,otel,docs]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m qwen_agent.demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check qwen_agent tests tools benchmarks
	$(BIN)/ruff format --check qwen_agent tests tools benchmarks

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
