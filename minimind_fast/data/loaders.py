"""Memory-mapped loaders over `.bin` shards, with deterministic shuffling and exact resume.

Every loader iterates forever (epoch after epoch, reshuffled from `seed + epoch`), gives each rank a
disjoint slice of every epoch's permutation, and reports in `state_dict()` the position just after the
last batch handed out, so a resumed run sees exactly the batches it would have seen. Nothing is
copied into RAM: samples are sliced out of `np.memmap`s as batches are built. On CUDA a background
thread prefetches into pinned memory.

Batches are dicts of CPU tensors (see `minimind_fast/data/FORMAT.md`): `input_ids`, `targets`
(already shifted, -100 where no loss), `position_ids` (restarting at every packed document),
`cu_seqlens` (int32 document offsets over the flattened batch) and `max_seqlen`; reasoning adds
`loss_weight`; DPO gives `chosen_*` and `rejected_*` of each.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minimind_fast.data.shards import Shard, ShardError

IGNORE = -100


def open_split(shard_dir: str | Path, split: str, vocab_size: int | None) -> tuple[dict, list[Shard]]:
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{shard_dir}: no manifest.json (run launch/tokenize.py first)")
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise ShardError(f"{shard_dir}: no '{split}' split in manifest.json")
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise ShardError(f"{shard_dir}: shards were tokenized with a vocabulary of {manifest['vocab_size']} "
                         f"tokens, more than the model's vocab_size {vocab_size}")
    shards = []
    for entry in manifest["splits"][split]["shards"]:
        path = shard_dir / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard listed in manifest.json is missing")
        shard = Shard(path)
        if vocab_size is not None:
            shard.check_vocab(vocab_size)
        shards.append(shard)
    return manifest, shards


class ShardLoader:
    """Base: per-epoch permutation of `n_items`, this rank's slice, position bookkeeping, prefetch."""

    def __init__(self, kind: str, shard_dir, *, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", vocab_size: int | None = None,
                 pin_memory: bool = False, prefetch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.kind, self.seq_len, self.batch_size = kind, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.manifest, self.shards = open_split(shard_dir, split, vocab_size)
        expected = {"pretrain": ("pretrain",), "sft": ("sft", "reasoning"), "reasoning": ("reasoning",),
                    "dpo": ("dpo",)}[kind]
        if self.manifest["kind"] not in expected:
            raise ShardError(f"{shard_dir}: shards are of kind {self.manifest['kind']!r}, "
                             f"this loader reads {kind!r}")
        self.epoch, self.cursor = 0, 0  # position in this rank's slice of the epoch's permutation
        self._build_index()

    # subclasses: self.n_items, self._take(order, cursor) -> (batch, new_cursor) or None at epoch end
    def _build_index(self) -> None:
        raise NotImplementedError

    def _rank_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_items)
        per_rank = self.n_items // self.world_size
        if per_rank == 0:
            raise ShardError(f"{self.kind} data has {self.n_items} samples, fewer than {self.world_size} ranks")
        return perm[self.rank::self.world_size][:per_rank]

    def _batches(self) -> Iterator[tuple[dict, int, int]]:
        epoch, cursor = self.epoch, self.cursor
        while True:
            order = self._rank_order(epoch)
            while True:
                taken = self._take(order, cursor)
                if taken is None:
                    break
                batch, cursor = taken
                yield batch, epoch, cursor
            epoch, cursor = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        source = self._batches() if not self.prefetch else _prefetched(self._batches(), self.prefetch,
                                                                        self.pin_memory)
        for batch, epoch, cursor in source:
            self.epoch, self.cursor = epoch, cursor
            yield batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(f"loader state is for world_size={state['world_size']}, seed={state['seed']}; "
                             f"this run has world_size={self.world_size}, seed={self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len


def _prefetched(source, depth: int, pin: bool):
    """Run `source` in a thread, `depth` batches ahead, pinning tensors for fast host-to-device copies."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        for batch, epoch, cursor in source:
            if pin:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            q.put((batch, epoch, cursor))

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


def _segments_to_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int,
                       weight: float | None = None) -> dict:
    """Rows of (input tokens, target tokens) segments -> padded tensors with per-segment positions."""
    bsz = len(rows)
    input_ids = np.zeros((bsz, seq_len), dtype=np.int64)
    targets = np.full((bsz, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((bsz, seq_len), dtype=np.int64)
    loss_weight = np.ones((bsz, seq_len), dtype=np.float32) if weight is not None else None
    cu, max_len = [0], 0
    for r, segments in enumerate(rows):
        col = 0
        for seg in segments:
            inp, tgt = seg[0], seg[1]
            n = len(inp)
            input_ids[r, col:col + n] = inp
            targets[r, col:col + n] = tgt
            positions[r, col:col + n] = np.arange(n)
            if loss_weight is not None:
                loss_weight[r, col:col + n] = np.where(seg[2], weight, 1.0)
            col += n
            cu.append(r * seq_len + col)
            max_len = max(max_len, n)
        if col < seq_len:  # the padding tail is its own segment
            positions[r, col:] = np.arange(seq_len - col)
            cu.append((r + 1) * seq_len)
            max_len = max(max_len, seq_len - col)
    batch = {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
             "position_ids": torch.from_numpy(positions),
             "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": max_len}
    if loss_weight is not None:
        batch["loss_weight"] = torch.from_numpy(loss_weight)
    return batch


class PretrainLoader(ShardLoader):
    """Windows of seq_len + 1 tokens over the packed stream (documents carry bos/eos)."""

    def _build_index(self) -> None:
        self.windows = [(s, w) for s, shard in enumerate(self.shards)
                        for w in range(max(shard.n_tokens - 1, 0) // self.seq_len)]
        self.n_items = len(self.windows)
        if self.n_items == 0:
            raise ShardError(f"pretrain shards hold fewer than seq_len + 1 = {self.seq_len + 1} tokens")

    def _window(self, item: int) -> list[tuple[np.ndarray, np.ndarray]]:
        s, w = self.windows[item]
        shard = self.shards[s]
        start = w * self.seq_len
        tokens = np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        # Document starts inside the window split it into segments; a target that is the first
        # token of the next document is not predictable from this one, so it gets no loss.
        lo, hi = np.searchsorted(shard.offsets, [start + 1, start + self.seq_len], side="left")
        cuts = [int(o) - start for o in shard.offsets[lo:hi]]
        segments, prev = [], 0
        for cut in cuts + [self.seq_len]:
            if cut > prev:
                tgt = tokens[prev + 1:cut + 1].copy()
                if cut < self.seq_len:
                    tgt[-1] = IGNORE
                segments.append((tokens[prev:cut], tgt))
            prev = cut
        return segments

    def _take(self, order, cursor):
        if cursor + self.batch_size > len(order):
            return None
        rows = [self._window(int(i)) for i in order[cursor:cursor + self.batch_size]]
        return _segments_to_batch(rows, self.seq_len), cursor + self.batch_size


class SFTLoader(ShardLoader):
    """Conversations with their assistant masks, packed several to a row (or one per row, padded)."""

    def __init__(self, *args, packing: bool = True, special_token_weight: float = 10.0, **kwargs):
        self.packing, self.special_token_weight = packing, special_token_weight
        super().__init__(*args, **kwargs)

    def _build_index(self) -> None:
        self.docs = [(s, d) for s, shard in enumerate(self.shards) for d in range(shard.n_docs)]
        self.n_items = len(self.docs)

    def _sample(self, item: int):
        s, d = self.docs[item]
        ids, mask = self.shards[s].doc(d)
        ids = np.asarray(ids[: self.seq_len], dtype=np.int64)
        mask = np.asarray(mask[: self.seq_len])
        tgt = np.full(len(ids), IGNORE, dtype=np.int64)
        tgt[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
        special = np.zeros(len(ids), dtype=bool)
        special[:-1] = mask[1:] == 2
        return ids, tgt, special

    def _take(self, order, cursor):
        rows = []
        while len(rows) < self.batch_size:
            if cursor >= len(order):
                return None
            row, used = [], 0
            while cursor < len(order):
                sample = self._sample(int(order[cursor]))
                if row and (not self.packing or used + len(sample[0]) > self.seq_len):
                    break
                row.append(sample)
                used += len(sample[0])
                cursor += 1
            rows.append(row)
        weight = self.special_token_weight if self.kind == "reasoning" else None
        return _segments_to_batch(rows, self.seq_len, weight), cursor


class DPOLoader(ShardLoader):
    """Chosen/rejected pairs (documents 2i and 2i+1), each padded to the longest in the batch."""

    def _build_index(self) -> None:
        self.pairs = [(s, d) for s, shard in enumerate(self.shards) for d in range(0, shard.n_docs - 1, 2)]
        self.n_items = len(self.pairs)

    def _take(self, order, cursor):
        if cursor + self.batch_size > len(order):
            return None
        out = {}
        for side, delta in (("chosen", 0), ("rejected", 1)):
            seqs = []
            for i in order[cursor:cursor + self.batch_size]:
                s, d = self.pairs[int(i)]
                ids, mask = self.shards[s].doc(d + delta)
                seqs.append((np.asarray(ids[: self.seq_len], np.int64), np.asarray(mask[: self.seq_len])))
            width = max(len(ids) for ids, _ in seqs)
            ids_t = torch.zeros(len(seqs), width, dtype=torch.int64)
            tgt_t = torch.full((len(seqs), width), IGNORE, dtype=torch.int64)
            for r, (ids, mask) in enumerate(seqs):
                ids_t[r, :len(ids)] = torch.from_numpy(ids)
                tgt = np.where(mask[1:] > 0, ids[1:], IGNORE)
                tgt_t[r, :len(ids) - 1] = torch.from_numpy(tgt)
            out[f"{side}_input_ids"], out[f"{side}_targets"] = ids_t, tgt_t
            out[f"{side}_position_ids"] = torch.arange(width).expand(len(seqs), width).clone()
        return out, cursor + self.batch_size

    @property
    def tokens_per_batch(self) -> int:
        return 2 * self.batch_size * self.seq_len


LOADERS = {"pretrain": PretrainLoader, "sft": SFTLoader, "reasoning": SFTLoader, "dpo": DPOLoader}


def build_loader(kind: str, shard_dir, *, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", vocab_size: int | None = None,
                 pin_memory: bool = False, **kwargs) -> ShardLoader:
    """The loader for `kind` (pretrain, sft, reasoning, dpo) over the shards in `shard_dir`."""
    if kind not in LOADERS:
        raise ValueError(f"kind={kind!r} must be one of {sorted(LOADERS)}")
    prefetch = kwargs.pop("prefetch", 4 if pin_memory else 0)
    return LOADERS[kind](kind, shard_dir, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                         rank=rank, world_size=world_size, split=split, vocab_size=vocab_size,
                         pin_memory=pin_memory, prefetch=prefetch, **kwargs)
