# semilla: the README's commands. `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := runs/demo

.PHONY: setup demo test bench lint format clean

setup: $(VENV)/.installed

# The pinned CPU torch goes in first, so no resolver ever pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Train a small model on the bundled Quijote excerpt (a few minutes on 2 CPU cores), then
# print samples. A finished demo model is reused: delete runs/demo to train again.
demo: setup $(DEMO)/best/config.json
	$(BIN)/semilla generate $(DEMO) --prompt "En un lugar de la Mancha" --max-new-tokens 300 \
		--temperature 0.8 --top-k 40 --num-samples 2 --seed 7

$(DEMO)/best/config.json:
	$(BIN)/semilla train --data src/semilla/demo/quijote.txt --out-dir $(DEMO) \
		--n-layer 4 --n-head 4 --n-embd 128 --block-size 128 --batch-size 16 \
		--max-iters 1500 --learning-rate 3e-3 --min-lr 3e-4 --warmup-iters 50 \
		--eval-interval 250 --save-interval 250

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/train_shakespeare.py

lint: setup
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
