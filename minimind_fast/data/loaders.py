"""Memory-mapped loaders over `.bin` shards, with deterministic shuffling and exact resume.

Every loader iterates forever (epoch after epoch, reshuffled from `(seed, epoch)`), gives each rank a
disjoint slice of every epoch's permutation, and reports in `state_dict()` the position just after the
last batch handed out, so a resumed run sees exactly the batches it would have seen. Nothing is
copied into RAM: samples are sliced out of `np.memmap`s as batches are built, and the indexes are a
few numbers per shard, so start-up does not grow with the corpus. On CUDA (`pin_memory=True`) a
background thread builds batches ahead into pinned memory.

Batches are dicts of CPU tensors (see `minimind_fast/data/FORMAT.md`): `input_ids`, `targets`
(already shifted, -100 where no loss), `position_ids` (restarting at every packed document),
`cu_seqlens` (int32 document offsets over the flattened batch) and `max_seqlen`; reasoning adds
`loss_weight`; DPO gives `chosen_*` and `rejected_*` of each, and `pair_index` (the pairs' numbers).
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_fast.data.shards import Shard, ShardError

IGNORE = -100
ACCEPTS = {"pretrain": ("pretrain",), "sft": ("sft", "reasoning"), "reasoning": ("reasoning",), "dpo": ("dpo",)}


def read_manifest(shard_dir: str | Path) -> dict:
    """`shard_dir/manifest.json`, with the fields the loaders and stages rely on checked (errors name it)."""
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{shard_dir}: no manifest.json (write shards with launch/tokenize.py)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if not (isinstance(manifest, dict) and manifest.get("kind") in ACCEPTS
            and isinstance(manifest.get("vocab_size"), int) and isinstance(manifest.get("splits"), dict)):
        raise ShardError(f"{path}: not a shard manifest (it needs a known 'kind', 'vocab_size' and 'splits'; "
                         f"rewrite the shards with launch/tokenize.py --force)")
    return manifest


def open_split(shard_dir: str | Path, split: str, vocab_size: int | None) -> tuple[dict, list[Shard]]:
    """The manifest and the mapped shards of one split, checked against the model's `vocab_size`."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    try:
        entries = manifest["splits"].get(split, {}).get("shards", [])
        files = [entry["file"] for entry in entries]
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{shard_dir / 'manifest.json'}: unreadable '{split}' split ({e!r})") from None
    if not entries:
        if isinstance(manifest["splits"].get(split), dict):  # listed without shards: tokenize.py --val-fraction 0
            raise ShardError(f"{shard_dir}: its '{split}' split is empty (no documents were held out when it was "
                             f"tokenized, as with --val-fraction 0)")
        raise ShardError(f"{shard_dir}: no '{split}' split in manifest.json")
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise ShardError(f"{shard_dir}: shards were tokenized with a vocabulary of {manifest['vocab_size']} "
                         f"tokens, more than the model's vocab_size {vocab_size}")
    shards = []
    for file, entry in zip(files, entries):
        path = shard_dir / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard listed in manifest.json is missing")
        # A shard truncated or swapped in from another run can still be self-consistent; only its
        # manifest entry tells. Header and stat only: a full read would cost minutes on a big corpus.
        _expect_listed(path, "bytes", path.stat().st_size, entry.get("bytes"))
        shard = Shard(path)
        _expect_listed(path, "vocab_size", shard.vocab_size, manifest["vocab_size"])
        _expect_listed(path, "tokens", shard.n_tokens, entry.get("tokens"))
        _expect_listed(path, "docs", shard.n_docs, entry.get("docs"))
        if shard.kind != manifest["kind"]:
            raise ShardError(f"{path}: a {shard.kind} shard in a {manifest['kind']} manifest")
        shards.append(shard)
    if vocab_size is not None:
        _check_token_ids(shard_dir, split, shards, entries, vocab_size)
    return manifest, shards


def _check_token_ids(shard_dir: Path, split: str, shards: list[Shard], entries: list[dict], vocab_size: int) -> None:
    """Each shard's largest token id, as its manifest entry records it, against the model's vocab_size.

    Reading every token instead would stall start-up for minutes on a large corpus; a shard changed
    after tokenizing is caught batch by batch (`ShardLoader._in_vocab`). Manifests written before
    the field existed get that full read, once, with a note on how to avoid it.
    """
    unrecorded = []
    for shard, entry in zip(shards, entries):
        top = entry.get("max_token_id")
        if top is None:
            unrecorded.append(shard)
        elif not isinstance(top, int) or isinstance(top, bool):
            raise ShardError(f"{shard_dir / 'manifest.json'}: max_token_id of {shard.path.name} is {top!r}, not an "
                             f"integer (rewrite the shards with launch/tokenize.py --force)")
        else:
            shard.check_max_token_id(top, vocab_size)
    if unrecorded:
        print(f"{shard_dir}: manifest.json was written before tokenize.py recorded each shard's largest token "
              f"id; reading its {len(unrecorded)} '{split}' shard(s) to check them against the vocabulary (slow on a "
              f"large corpus: run launch/tokenize.py again on the same inputs to record it)",
              file=sys.stderr, flush=True)
        for shard in unrecorded:
            shard.check_vocab(vocab_size)


def _expect_listed(path: Path, field: str, actual: int, listed) -> None:
    if actual != listed:
        raise ShardError(f"{path}: {field} is {actual}, manifest.json lists {listed} (the shard was truncated or "
                         f"replaced after tokenizing; rewrite the shards with launch/tokenize.py --force)")


def fingerprint(parts: list[str]) -> str:
    """A short digest identifying the data a loader reads (its position means nothing for other data)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def shards_fingerprint(entries: list[dict]) -> str | None:
    """The split's identity from its manifest's per-shard checksums; None for a manifest from a
    tokenize.py that did not record them (then a resume cannot tell re-tokenized data apart)."""
    sums = [entry.get("checksum") for entry in entries]
    return fingerprint(sums) if sums and all(isinstance(s, str) for s in sums) else None


def check_resume_state(saved: dict, mine: dict, keys: tuple[str, ...], items: str) -> None:
    """A saved loader position only means the same data under the same settings: refuse any change."""
    for key in keys:
        if key in saved and saved[key] != mine[key]:
            raise ValueError(f"loader state has {key}={saved[key]!r}, this run has {mine[key]!r}: "
                             f"resuming would not see the same {items}")
    if saved.get("data") and mine.get("data") and saved["data"] != mine["data"]:
        raise ValueError(f"the {items} changed since the checkpoint was written (data fingerprint "
                         f"{saved['data']} then, {mine['data']} now: re-tokenized or replaced?); resuming would "
                         f"continue at a position in other data. Restore the data, or start a new run "
                         f"(--init the checkpoint) instead of --resume")


class ShardLoader:
    """Base: per-epoch permutation of `n_items`, this rank's slice, position bookkeeping, prefetch.

    Subclasses set `n_items` in `_build_index()` and build batches in `_take(order, cursor)`, which
    returns `(batch, new_cursor)` or None when this rank's slice of the epoch cannot fill a batch.
    """

    def __init__(self, kind: str, shard_dir: str | Path, *, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", vocab_size: int | None = None,
                 pin_memory: bool = False, prefetch: int = 0, drop_last: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive")
        self.kind, self.seq_len, self.batch_size = kind, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size, self.split = seed, rank, world_size, split
        # Training drops an epoch's last, short batch; evaluation keeps it (default: by split).
        self.drop_last = split == "train" if drop_last is None else drop_last
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.vocab_size = vocab_size
        self.manifest, self.shards = open_split(shard_dir, split, vocab_size)
        self.data_id = shards_fingerprint(self.manifest["splits"][split]["shards"])
        if self.manifest["kind"] not in ACCEPTS[kind]:
            raise ShardError(f"{shard_dir}: shards are of kind {self.manifest['kind']!r}, "
                             f"this loader reads {kind!r}")
        self.epoch, self.cursor = 0, 0  # position in this rank's slice of the epoch's permutation
        self._build_index()
        if self.n_items < world_size:
            raise ShardError(f"{shard_dir}: the {split} split has {self.n_items} {kind} samples, "
                             f"fewer than {world_size} ranks")
        if not self._fills_one_batch():
            raise ShardError(f"{shard_dir}: the {split} split's {self.n_items} samples cannot fill one batch "
                             f"of {micro_batch_size} per rank on {world_size} ranks")

    def _build_index(self) -> None:
        raise NotImplementedError

    def _in_vocab(self, shard: Shard, ids: np.ndarray) -> np.ndarray:
        """`ids`, read from `shard`, checked against the model's vocabulary: the manifest's max_token_id
        vouches for the shard as written, this for what is read (an id past the embedding would
        otherwise stop the run with an indexing error, or a device-side assert on CUDA)."""
        if self.vocab_size is not None:
            shard.check_vocab(self.vocab_size, ids)
        return ids

    def _take(self, order: np.ndarray, cursor: int):
        raise NotImplementedError

    def _rank_order(self, epoch: int) -> np.ndarray:
        """This rank's items for `epoch`: every world_size-th of a seeded permutation, equal counts per rank."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_items)
        per_rank = self.n_items // self.world_size
        return perm[self.rank::self.world_size][:per_rank]

    def _batches(self) -> Iterator[tuple[dict, int, int]]:
        """(batch, epoch, cursor after it) forever, from the current position."""
        epoch, cursor = self.epoch, self.cursor
        while True:
            order = self._rank_order(epoch)
            while (taken := self._take(order, cursor)) is not None:
                batch, cursor = taken
                yield batch, epoch, cursor
            epoch, cursor = epoch + 1, 0

    def one_pass(self) -> Iterator[dict]:
        """The batches of one pass over this rank's share of the split, from the current position (for
        evaluation: `__iter__` goes on through epochs)."""
        for batch, epoch, _ in self._batches():
            if epoch > self.epoch:
                return
            yield batch

    def __iter__(self) -> Iterator[dict]:
        source = self._batches()
        if self.prefetch:
            source = _prefetched(source, self.prefetch, self.pin_memory)
        for batch, epoch, cursor in source:
            self.epoch, self.cursor = epoch, cursor
            yield batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "split": self.split, "epoch": self.epoch, "cursor": self.cursor,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "seq_len": self.seq_len, "micro_batch_size": self.batch_size, "data": self.data_id}

    def load_state_dict(self, state: dict) -> None:
        if "mixture" in state:  # a MixtureLoader's (minimind_fast.data.mixture)
            paths = ", ".join(f"{e['path']}:{e['weight']:.4g}" for e in state["mixture"])
            raise ValueError(f"the checkpoint trained on a mixture of {len(state['mixture'])} --data sources "
                             f"({paths}) and this run reads one directory: resume with the same sources and "
                             f"weights, or start anew in another --out")
        check_resume_state(state, self.state_dict(), ("kind", "seed", "rank", "world_size", "seq_len",
                                                      "micro_batch_size"), "samples")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _fills_one_batch(self) -> bool:
        return self.num_batches_per_epoch > 0

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches this rank gets per epoch (for packed SFT, of the current epoch's permutation)."""
        per_rank = self.n_items // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)


def _prefetched(source: Iterator, depth: int, pin: bool) -> Iterator:
    """Run `source` in a thread, `depth` batches ahead, pinning tensors for fast host-to-device copies."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in source:
                batch = item[0]
                if pin:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                while not stop.is_set():
                    try:
                        q.put((batch, *item[1:]), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="loader-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped iterating: let the thread end
        stop.set()


def _locate(cum: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global item numbers -> (shard, local index), given the cumulative item counts per shard."""
    s = np.searchsorted(cum, items, side="right") - 1
    return s, items - cum[s]


def _segments_to_batch(rows: list[list[tuple]], seq_len: int, weight: float | None = None) -> dict:
    """Rows of (input tokens, target tokens[, special]) segments -> padded tensors with per-segment positions.

    The padding tail of a row is a segment of its own in `cu_seqlens` (its targets are all -100), so
    attention never mixes it with real tokens.
    """
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
        if col < seq_len:
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
    """Windows of seq_len + 1 tokens over each shard's packed stream (documents carry bos/eos)."""

    def _build_index(self) -> None:
        per_shard = [max(shard.n_tokens - 1, 0) // self.seq_len for shard in self.shards]
        self.cum = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self.n_items = int(self.cum[-1])
        if self.n_items == 0:
            raise ShardError(f"{self.shards[0].path.parent}: the {self.split} split has fewer than "
                             f"seq_len + 1 = {self.seq_len + 1} tokens per shard")

    def _window(self, shard: Shard, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
        start = w * self.seq_len
        tokens = self._in_vocab(shard, np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        # Document starts inside the window split it into segments. The first token of the next
        # document is not predictable from this one, so as a target it gets no loss.
        lo, hi = np.searchsorted(shard.offsets, [start + 1, start + self.seq_len], side="left")
        cuts = [int(o) - start for o in shard.offsets[lo:hi]]
        segments, prev = [], 0
        for cut in [*cuts, self.seq_len]:
            tgt = tokens[prev + 1:cut + 1].copy()
            if cut < self.seq_len:
                tgt[-1] = IGNORE
            segments.append((tokens[prev:cut], tgt))
            prev = cut
        if hi < len(shard.offsets) and int(shard.offsets[hi]) == start + self.seq_len:
            segments[-1][1][-1] = IGNORE  # the window's last target opens the next document
        return segments

    def _take(self, order, cursor):
        n = min(self.batch_size, len(order) - cursor)
        if n <= 0 or (self.drop_last and n < self.batch_size):
            return None
        shard_idx, local = _locate(self.cum, order[cursor:cursor + n])
        rows = [self._window(self.shards[s], int(w)) for s, w in zip(shard_idx, local)]
        return _segments_to_batch(rows, self.seq_len), cursor + n


class SFTLoader(ShardLoader):
    """Conversations with their assistant masks, packed several to a row (or one per row, padded)."""

    def __init__(self, *args: Any, packing: bool = True, special_token_weight: float = 10.0, **kwargs: Any):
        self.packing, self.special_token_weight = packing, special_token_weight
        self._batches_in_epoch: tuple[int, int] | None = None
        super().__init__(*args, **kwargs)

    def _build_index(self) -> None:
        self.cum = np.concatenate([[0], np.cumsum([s.n_docs for s in self.shards])]).astype(np.int64)
        self.n_items = int(self.cum[-1])

    def _sample(self, item: int):
        s, d = _locate(self.cum, np.int64(item))
        ids, mask = self.shards[int(s)].doc(int(d))
        ids = self._in_vocab(self.shards[int(s)], np.asarray(ids[: self.seq_len], dtype=np.int64))
        mask = np.asarray(mask[: self.seq_len])
        tgt = np.full(len(ids), IGNORE, dtype=np.int64)
        tgt[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)  # predict token t+1 where it is the assistant's
        special = np.zeros(len(ids), dtype=bool)
        special[:-1] = mask[1:] == 2
        return ids, tgt, special

    def _lengths(self, order: np.ndarray) -> np.ndarray:
        s, d = _locate(self.cum, order)
        lens = np.empty(len(order), dtype=np.int64)
        for i, shard in enumerate(self.shards):
            sel = s == i
            offs = np.asarray(shard.offsets)
            lens[sel] = offs[d[sel] + 1] - offs[d[sel]]
        return np.minimum(lens, self.seq_len)

    def _take(self, order, cursor):
        rows = []
        while len(rows) < self.batch_size and cursor < len(order):
            row, used = [], 0
            while cursor < len(order):
                sample = self._sample(int(order[cursor]))
                if row and (not self.packing or used + len(sample[0]) > self.seq_len):
                    break
                row.append(sample)
                used += len(sample[0])
                cursor += 1
            rows.append(row)
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            return None
        weight = self.special_token_weight if self.kind == "reasoning" else None
        return _segments_to_batch(rows, self.seq_len, weight), cursor

    def _packed_rows(self, epoch: int, limit: int | None = None) -> int:
        """Rows the greedy packing of `_take` makes from this rank's epoch (stopping at `limit`)."""
        rows, used, filled = 0, 0, False
        for n in self._lengths(self._rank_order(epoch)).tolist():
            if filled and used + n > self.seq_len:
                rows, used = rows + 1, 0
                if limit is not None and rows >= limit:
                    return rows
            used, filled = used + n, True
        return rows + filled

    def _fills_one_batch(self) -> bool:
        if not self.packing:
            return super()._fills_one_batch()
        return self._packed_rows(self.epoch, self.batch_size) >= (self.batch_size if self.drop_last else 1)

    @property
    def num_batches_per_epoch(self) -> int:
        if not self.packing:
            return super().num_batches_per_epoch
        if self._batches_in_epoch is None or self._batches_in_epoch[0] != self.epoch:
            rows = self._packed_rows(self.epoch)
            count = rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
            self._batches_in_epoch = (self.epoch, count)
        return self._batches_in_epoch[1]


class DPOLoader(ShardLoader):
    """Chosen/rejected pairs (documents 2i and 2i+1), each side padded to the longest in the batch."""

    def _build_index(self) -> None:
        for shard in self.shards:
            if shard.n_docs % 2:
                raise ShardError(f"{shard.path}: a DPO shard needs an even number of documents, has {shard.n_docs}")
        self.cum = np.concatenate([[0], np.cumsum([s.n_docs // 2 for s in self.shards])]).astype(np.int64)
        self.n_items = int(self.cum[-1])

    def _take(self, order, cursor):
        n = min(self.batch_size, len(order) - cursor)
        if n <= 0 or (self.drop_last and n < self.batch_size):
            return None
        return self.pairs_batch(order[cursor:cursor + n]), cursor + n

    def pairs_batch(self, pairs: np.ndarray) -> dict:
        """The batch of the given pair numbers of this split, in that order.

        `pair_index` carries them: a stable id per pair (for reference log-probs computed once).
        `{side}_lengths` are the rows' token counts before padding (a reward model reads the last token).
        """
        pairs = np.asarray(pairs, dtype=np.int64)
        n = len(pairs)
        shard_idx, pair = _locate(self.cum, pairs)
        out = {"pair_index": torch.from_numpy(pairs.copy())}
        for side, delta in (("chosen", 0), ("rejected", 1)):
            seqs = []
            for s, p in zip(shard_idx, pair):
                ids, mask = self.shards[s].doc(2 * int(p) + delta)
                ids = self._in_vocab(self.shards[s], np.asarray(ids[: self.seq_len], np.int64))
                seqs.append((ids, np.asarray(mask[: self.seq_len])))
            width = max(len(ids) for ids, _ in seqs)
            ids_t = np.zeros((n, width), dtype=np.int64)
            tgt_t = np.full((n, width), IGNORE, dtype=np.int64)
            for r, (ids, mask) in enumerate(seqs):
                ids_t[r, :len(ids)] = ids
                tgt_t[r, :len(ids) - 1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
            out[f"{side}_input_ids"] = torch.from_numpy(ids_t)
            out[f"{side}_targets"] = torch.from_numpy(tgt_t)
            out[f"{side}_position_ids"] = torch.arange(width).expand(n, width).clone()
            out[f"{side}_lengths"] = torch.tensor([len(ids) for ids, _ in seqs], dtype=torch.long)
        return out

    @property
    def tokens_per_batch(self) -> int:
        return 2 * self.batch_size * self.seq_len


LOADERS = {"pretrain": PretrainLoader, "sft": SFTLoader, "reasoning": SFTLoader, "dpo": DPOLoader}


def build_loader(kind: str, shard_dir: str | Path, *, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", vocab_size: int | None = None,
                 pin_memory: bool = False, drop_last: bool | None = None, **kwargs: Any) -> ShardLoader:
    """The loader for `kind` (pretrain, sft, reasoning, dpo) over the shards in `shard_dir`.

    Extra keyword arguments: `prefetch` (batches built ahead in a thread; default 4 with pin_memory,
    else 0); for sft/reasoning `packing` (default True) and `special_token_weight` (default 10.0).
    """
    if kind not in LOADERS:
        raise ValueError(f"kind={kind!r} must be one of {sorted(LOADERS)}")
    prefetch = kwargs.pop("prefetch", 4 if pin_memory else 0)
    if kind in ("pretrain", "dpo") and kwargs:
        raise TypeError(f"{kind} loader got unexpected arguments {sorted(kwargs)}")
    return LOADERS[kind](kind, shard_dir, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                         rank=rank, world_size=world_size, split=split, vocab_size=vocab_size,
                         pin_memory=pin_memory, prefetch=prefetch, drop_last=drop_last, **kwargs)
