# Two set-up commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench install fonts

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge demo

test: $(STAMP)
	$(BIN)/ruff check lmforge tests bench
	$(BIN)/pytest -q --durations=15  # the slowest tests in every CI log: the suite must stay under 10 minutes

test-all: $(STAMP)
	# llama.cpp's Python binding compiles from source (about 30 minutes on 2 cores): the GGUF tests run it.
	$(BIN)/pip install --quiet llama-cpp-python==0.3.36
	$(BIN)/pytest -q -m ''

bench: $(STAMP)
	$(BIN)/python bench/peak.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/compress.py --threads 1

fonts:
	# Chinese in every PNG lmforge draws (explain pictures, loss curves, confusion matrices): Debian/Ubuntu's Noto CJK.
	# Elsewhere any font named in lmforge/evaluate/report.py's CJK_FONTS works; lmforge says once when none is found.
	apt-get install -y fonts-noto-cjk
