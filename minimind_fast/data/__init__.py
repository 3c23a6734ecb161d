"""The data layer: JSONL -> tokenizer -> `.bin` shards -> memory-mapped batches.

- `corpus`     the built-in corpus (no download), in MiniMind's JSONL formats
- `tokenizer`  byte-level BPE training, loading (ours or MiniMind's), the ChatML template
- `records`    one JSONL record -> text and loss spans; token offsets -> loss mask
- `shards`     the versioned `.bin` format (see FORMAT.md): writer and memory-mapped reader
- `pipeline`   streamed, parallel JSONL -> shards with a manifest
- `loaders`    pretrain / SFT / reasoning / DPO batches with deterministic shuffling and exact resume
- `mixture`    several shard directories mixed by weight (`--data web:0.7 code:0.3`), one source per micro-batch
"""
