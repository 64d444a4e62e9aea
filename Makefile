# One command each, on a fresh machine: `make demo` (set up + run the demo), `make test` (set up + tests).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench fuzz clean

setup:
	scripts/setup.sh

demo: setup
	$(BIN)/llama3v demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check llama3v tests bench

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache

fuzz: setup
	$(BIN)/python tests/fuzz_harness.py --cases 5000 --kinds gguf-model,gguf-mmproj,image,video,values
