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
# DeepSpeed builds a small C++ op on its first CPU run, into torch's shared extension cache by default;
# two checkouts testing at once then rebuild it over each other (its hash follows the venv's path) and
# a build cut short leaves a lock that hangs every later start. Each checkout keeps its own.
TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export TORCH_EXTENSIONS_DIR

.PHONY: install demo demo-all test test-fast test-gpu bench bench-gpu lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Machines without nvidia-smi get torch pinned to 2.13.0 (the CPU build where the index serves one);
	# CUDA machines keep pip's default (CUDA) build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Most tests are one process waiting on a subprocess's start-up (imports, DeepSpeed), so two pytest
# workers keep a 2-core machine busy: the suite took 9 min against 15.6 min in one worker. One torch
# thread per worker (the subprocesses get one too, tests/launch_helpers.py): two workers of two threads
# each oversubscribed the cores, and in-process model tests ran about 20% slower.
TEST_WORKERS ?= 2
TEST_ENV = TRITON_INTERPRET=1 OMP_NUM_THREADS=1
test: $(STAMP) lint
	$(TEST_ENV) $(BIN)/pytest -q -m "not gpu" -n $(TEST_WORKERS)

test-fast: $(STAMP) lint
	$(TEST_ENV) $(BIN)/pytest -q -m "not gpu and not slow" -n $(TEST_WORKERS)

test-gpu: $(STAMP)
	$(BIN)/pytest -q -m "gpu or not slow" tests/

# The demo: built-in corpus -> tokenizer -> shards -> pretrain (2 DeepSpeed ranks) -> SFT -> a chat reply.
DEMO_RANKS ?= 2
DS = $(BIN)/deepspeed --num_gpus $(DEMO_RANKS)
DEMO_FLAGS := --preset tiny --vocab-size 1024 --seq-len 256 --micro-batch-size 8 --log-every 10 --eval-every 100
demo: $(STAMP)
	$(PY) launch/make_corpus.py --out $(DATA)/builtin
	$(PY) launch/train_tokenizer.py --data $(DATA)/builtin/pretrain.jsonl $(DATA)/builtin/sft.jsonl \
		$(DATA)/builtin/reasoning.jsonl --vocab-size 1024 --out $(DATA)/tokenizer
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

# Held-out perplexity of the demo's models, then every post-training stage after `make demo`, each the
# shared engine on the built-in data (CPU: minutes):
# LoRA (identity) -> chat with the adapter; DPO and a reward model (for GRPO/PPO --reward-model) from the
# SFT model; reasoning distillation
# (<think>/<answer>, tag tokens weighted; --teacher adds a KL term, see README); GRPO on arithmetic.
STAGE_FLAGS := --seq-len 256 --micro-batch-size 8 --log-every 10 --eval-every 0
demo-all: demo
	$(PY) launch/evaluate.py --model $(DEMO)/pretrain --data $(DATA)/shards/pretrain --seq-len 256
	$(PY) launch/evaluate.py --model $(DEMO)/sft --data $(DATA)/shards/sft --seq-len 256
	$(PY) launch/tokenize.py --kind sft --data $(DATA)/builtin/lora.jsonl --seq-len 256 \
		--tokenizer $(DATA)/tokenizer --out $(DATA)/shards/lora
	$(PY) launch/tokenize.py --kind dpo --data $(DATA)/builtin/dpo.jsonl --seq-len 256 \
		--tokenizer $(DATA)/tokenizer --out $(DATA)/shards/dpo
	$(PY) launch/tokenize.py --kind reasoning --data $(DATA)/builtin/reasoning.jsonl --seq-len 256 \
		--tokenizer $(DATA)/tokenizer --out $(DATA)/shards/reasoning
	$(PY) launch/inspect_shards.py --data $(DATA)/shards/reasoning --show 1
	$(DS) launch/lora.py --init $(DEMO)/sft --data $(DATA)/shards/lora --out $(DEMO)/lora $(STAGE_FLAGS) \
		--lora-rank 8 --lora-alpha 16 --steps 80 --lr 5e-3 --warmup-steps 5 --save-every 40
	$(PY) launch/chat.py --model $(DEMO)/sft --lora $(DEMO)/lora --prompt "Who made you?" --temperature 0
	$(DS) launch/dpo.py --init $(DEMO)/sft --data $(DATA)/shards/dpo --out $(DEMO)/dpo $(STAGE_FLAGS) \
		--precompute-reference --beta 0.1 --steps 60 --lr 5e-5 --warmup-steps 5 --save-every 30
	$(DS) launch/reward_model.py --init $(DEMO)/sft --data $(DATA)/shards/dpo --out $(DEMO)/rm $(STAGE_FLAGS) \
		--steps 60 --lr 1e-3 --warmup-steps 5 --save-every 30
	$(DS) launch/distill.py --init $(DEMO)/sft --data $(DATA)/shards/reasoning --out $(DEMO)/distill \
		$(STAGE_FLAGS) --steps 200 --lr 1e-3 --warmup-steps 10 --save-every 100
	$(PY) launch/chat.py --model $(DEMO)/distill --prompt "What is 3 + 4 - 2?" --temperature 0
	$(DS) launch/grpo.py --init $(DEMO)/distill --data $(DATA)/builtin/grpo_prompts.jsonl --out $(DEMO)/grpo \
		--reward answer --reward format --group-size 8 --micro-batch-size 4 --max-new-tokens 48 \
		--steps 20 --lr 1e-5 --log-every 5 --save-every 10
	$(PY) launch/chat.py --model $(DEMO)/grpo --prompt "What is 12 + 7?" --temperature 0
	$(DS) launch/ppo.py --init $(DEMO)/distill --data $(DATA)/builtin/grpo_prompts.jsonl --out $(DEMO)/ppo \
		--reward-model $(DEMO)/rm:0.5 --reward answer --reward format --reward repetition:0.5 \
		--missing-eos-penalty 0.5 --seq-len 256 --micro-batch-size 4 \
		--max-new-tokens 48 --steps 12 --lr 1e-5 --log-every 4 --save-every 12

clean:
	rm -rf $(DEMO) $(DATA)

bench: $(STAMP)
	$(BIN)/pytest benchmarks/ -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
	$(PY) benchmarks/report.py

bench-gpu: $(STAMP)
	$(BIN)/pytest benchmarks/ -q -p no:cacheprovider --gpu-sizes --benchmark-columns=median,iqr,rounds
	$(PY) benchmarks/report.py
