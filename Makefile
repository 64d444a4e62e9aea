# One command each, on a fresh machine: `make demo` (set up + run the demo), `make test` (set up + tests).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench eval fuzz clean

setup:
	scripts/setup.sh

demo: setup
	$(BIN)/llama3v demo

test: setup
	$(BIN)/python -m pytest -q

# ruff only, never the engine: .venv's ruff once `make setup` has run, else a small .lint-venv with ruff alone.
RUFF := $(if $(wildcard $(BIN)/ruff),$(BIN)/ruff,.lint-venv/bin/ruff)

lint: $(RUFF)
	$(RUFF) check llama3v tests bench scripts

.lint-venv/bin/ruff:
	python3 -m venv .lint-venv
	.lint-venv/bin/python -m pip install --quiet ruff

bench: setup
	$(BIN)/python bench/run.py

eval: setup
	$(BIN)/python bench/tiny_accuracy.py

clean:
	rm -rf $(VENV) .lint-venv .pytest_cache

fuzz: setup
	$(BIN)/python tests/fuzz_harness.py --cases 5000 --kinds gguf-model,gguf-mmproj,image,video,values
