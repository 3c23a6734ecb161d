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

# The demo: built-in corpus -> tokenizer -> shards -> pretrain (2 DeepSpeed ranks) -> SFT -> a chat reply.
DEMO_RANKS ?= 2
DS = $(BIN)/deepspeed --num_gpus $(DEMO_RANKS)
DEMO_FLAGS := --preset tiny --vocab-size 1024 --seq-len 256 --micro-batch-size 8 --log-every 10 --eval-every 100
demo: $(STAMP)
	$(PY) launch/make_corpus.py --out $(DATA)/builtin
	$(PY) launch/train_tokenizer.py --data $(DATA)/builtin/pretrain.jsonl $(DATA)/builtin/sft.jsonl \
		--vocab-size 1024 --out $(DATA)/tokenizer
	$(PY) launch/tokenize.py --kind pretrain --data $(DATA)/builtin/pretrain.jsonl \
		--tokenizer $(DATA)/tokenizer --out $(DATA)/shards/pretrain
	$(PY) launch/tokenize.py --kind sft --data $(DATA)/builtin/sft.jsonl --seq-len 256 \
		--tokenizer $(DATA)/tokenizer --out $(DATA)/shards/sft
	$(DS) launch/pretrain.py $(DEMO_FLAGS) --data $(DATA)/shards/pretrain --out $(DEMO)/pretrain \
		--steps 300 --lr 3e-3 --warmup-steps 20 --save-every 100
	$(DS) launch/sft.py --init $(DEMO)/pretrain --data $(DATA)/shards/sft --out $(DEMO)/sft \
		--seq-len 256 --micro-batch-size 8 --steps 150 --lr 1e-3 --warmup-steps 10 --save-every 50 \
		--log-every 10 --eval-every 50
	$(PY) launch/chat.py --model $(DEMO)/sft --prompt "What colour is the cat?" --temperature 0

clean:
	rm -rf $(DEMO) $(DATA)

bench: $(STAMP)
	$(BIN)/pytest benchmarks/ -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
	$(PY) benchmarks/report.py

bench-gpu: $(STAMP)
	$(BIN)/pytest benchmarks/ -q -p no:cacheprovider --gpu-sizes --benchmark-columns=median,iqr,rounds
	$(PY) benchmarks/report.py
