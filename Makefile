# semilla: the README's commands. `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := runs/demo

.PHONY: setup demo test test-fast bench peers lint format clean llama-cpp browser services screenshots

# llama-cpp-python compiles llama.cpp (about 7 minutes on 2 cores): the wheel is built once into
# a cache outside the clone, then every fresh venv installs it from there. Portable x86-64 build
# (AVX2/FMA/F16C, no -march=native), CPU only, no tools, examples or server.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/semilla/wheels
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

setup: $(VENV)/.installed $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

# The pinned CPU torch goes in first, so no resolver ever pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

llama-cpp: $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

$(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION): | $(VENV)/.installed
	@command -v cmake >/dev/null && command -v g++ >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel --quiet --no-deps --no-binary llama-cpp-python -w $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet 'diskcache>=5.6.1' 'jinja2>=2.11.3'
	$(BIN)/pip install --quiet --no-index --find-links $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

# Train a small chat model on the bundled Quijote excerpt and conversations built from its
# dialogue (semilla/demo/chat_rows.py), then print samples and serve it. The time is announced
# before training starts; Ctrl+C stops it and `make demo` again resumes where it stopped. A
# finished demo is marked by $(DEMO_DONE): delete runs/demo to train again.
DEMO_DONE := $(DEMO)/demo-finished
DEMO_CHAT := runs/demo-chat.jsonl
DEMO_MINUTES := 4
# AdamW, not the default Muon: on this small corpus, passed over some 20 times, AdamW generalised
# better (the excerpt alone: best validation loss 3.92 against 4.15; bench/README.md, "Tokens to quality").
DEMO_TRAIN := --data src/semilla/demo/quijote.txt,$(DEMO_CHAT) --tokenizer bpe --vocab-size 1024 \
	--n-layer 4 --n-head 4 --n-embd 128 --block-size 512 --batch-size 8 --max-iters 500 \
	--learning-rate 3e-3 --min-lr 3e-4 --warmup-iters 50 --weight-decay 0.01 --optimizer adamw \
	--eval-interval 100 --save-interval 100 \
	--sample-interval 250

demo: setup $(DEMO_DONE)
	$(BIN)/semilla generate $(DEMO) --prompt "En un lugar de la Mancha" --max-new-tokens 120 \
		--temperature 0.8 --top-k 40 --num-samples 2 --seed 7
	@echo "semilla: chat with the demo model at http://127.0.0.1:$${PORT:-8000}/ (Ctrl+C stops the server)"
	$(BIN)/semilla serve $(DEMO) --data-dir runs/demo-server

$(DEMO_DONE):
	@echo "semilla: training the demo model: about $(DEMO_MINUTES) minutes on 2 idle CPU cores, longer on a" \
		"busy machine. Ctrl+C stops it; run 'make demo' again to resume."
	@mkdir -p $(dir $(DEMO_CHAT))
	$(BIN)/python -m semilla.demo.chat_rows > $(DEMO_CHAT)
	@if [ -f $(DEMO)/last/trainer_state.json ]; then \
		$(BIN)/semilla train --resume $(DEMO); \
	else \
		$(BIN)/semilla train $(DEMO_TRAIN) --out-dir $(DEMO) --overwrite; \
	fi
	touch $@

test: setup browser services
	$(BIN)/pytest -q --durations=25

# The quick loop: every test but those marked slow (30 s or more each; `make test` runs them).
test-fast: setup browser services
	$(BIN)/pytest -q -m 'not slow' --durations=10

# The browser tests drive Debian's chromium (Playwright's own download needs the network).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The replica tests start their own PostgreSQL and Redis (Debian's servers) on loopback; the
# alerting tests check the shipped rules with promtool (Debian's prometheus package ships it).
services:
	@command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql redis-server >/dev/null)
	@command -v promtool >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# Screenshots of the chat and the dashboard (desktop and phone) for the README.
screenshots: setup browser
	SEMILLA_SCREENSHOTS=docs/screenshots $(BIN)/pytest -q tests/test_web_browser.py

bench: setup peers
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/train_peers.py --litgpt-python $(PEERS)/bin/python
	$(BIN)/python bench/quality_race.py --litgpt-python $(PEERS)/bin/python
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/cost_growth.py
	$(BIN)/python bench/grow.py
	$(BIN)/python bench/generate_speed.py
	$(BIN)/python bench/engine_speed.py
	$(BIN)/python bench/serve_load.py --compare-auth
	$(BIN)/python bench/serve_load.py --grpc --clients 1 --clients 16
	$(BIN)/python bench/inference_compare.py
	$(BIN)/python bench/inference_compare.py --shape 50m

lint: setup
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The training peers of bench/train_peers.py that cannot share semilla's venv: litgpt pins
# huggingface-hub below what transformers needs. Same torch, so the comparison is like for like.
PEERS := .venv-peers
peers: $(PEERS)/.installed
$(PEERS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet torch==2.13.0
	$(PEERS)/bin/pip install --quiet -e . 'litgpt>=0.5.13,<0.6' 'requests>=2.31,<3'
	touch $@
