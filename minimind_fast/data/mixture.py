"""Training on several shard directories at chosen proportions: `--data web:0.7 code:0.3`.

Each source keeps its own loader (its own shuffled order, epochs and resume position: a small source
simply repeats sooner). Every micro-batch comes whole from one source, picked by `MixtureSchedule`
from the run's seed and the micro-batch's number, so the weights are shares of micro-batches. For
pretraining (every row a full window of seq_len tokens) that is also the share of tokens; for packed
SFT it is the share of batch positions (a row's padded end holds no tokens); for unpacked SFT and DPO
batches it is the share of rows or pairs.

The schedule is Weyl's additive sequence u_k = frac(s + k * phi), phi = (sqrt(5) - 1) / 2 and s drawn
from the seed, with source i taking the micro-batches whose u_k falls in its slice of [0, 1) (slices
as wide as the normalised weights). Of the golden ratio's multiples, any n consecutive micro-batches
hold each source's share to within a few batches (the gap grows as log n), where independent draws
would stray by sqrt(n): the proportions hold over a short run, not only on average. k counts
micro-batches over the ranks (a rank's batch index x ranks + its rank), so each optimizer step's
global batch mixes the sources too.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimind_fast.data.loaders import ShardLoader

PHI = (math.sqrt(5) - 1) / 2
SCHEDULE_STREAM = 0x6D6978  # keeps the schedule's draw from the seed apart from the loaders' (seed, epoch)


@dataclass(frozen=True)
class DataSource:
    """One `--data DIR[:WEIGHT]` of a mixture."""

    spec: str  # as given on the command line
    path: Path
    weight: float  # normalised: a mixture's weights sum to 1
    name: str  # the directory's basename, made unique: it names the source's val_loss_<name>


def parse_source(spec: str) -> tuple[str, float | None]:
    """`DIR[:WEIGHT]` -> (DIR, WEIGHT or None). A spec naming an existing path is a path whole (a
    directory may have ':' in its name), and so is one whose tail after the last ':' is no number."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists():
        return spec, None
    try:
        weight = float(tail)
    except ValueError:
        return spec, None
    if not 0 < weight < math.inf:  # written so that NaN fails too
        raise ValueError(f"{spec}: the weight {tail!r} of {head} is not a positive finite number")
    return head, weight


def parse_sources(specs: list[str]) -> list[DataSource]:
    """The `--data` specs as sources with normalised weights (default 1) and unique names; a bad weight
    or a directory given twice (after resolving links) is a ValueError naming it (argparse adds the flag)."""
    parsed = [parse_source(spec) for spec in specs]
    seen: dict[Path, str] = {}
    for spec, (path, _) in zip(specs, parsed):
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{spec}: the directory {key} is given twice (also as {seen[key]})")
        seen[key] = spec
    weights = [1.0 if w is None else w for _, w in parsed]
    total = math.fsum(weights)
    names = unique_names([Path(path).resolve().name for path, _ in parsed])
    return [DataSource(spec, Path(path), w / total, name)
            for spec, (path, _), w, name in zip(specs, parsed, weights, names)]


def unique_names(names: list[str]) -> list[str]:
    """`names` with the second and later of a repeated one suffixed _2, _3, ... (a/web and b/web)."""
    taken = set(names)
    out, counts = [], {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > 1:
            n = counts[name]
            while f"{name}_{n}" in taken:
                n += 1
            name = f"{name}_{n}"
            taken.add(name)
        out.append(name)
    return out


def data_argument(data: str | list[str]) -> Path | list[DataSource]:
    """The parsed `--data`: one directory as the path it always was, several as a mixture's sources."""
    return Path(data) if isinstance(data, str) else parse_sources(data)


def data_label(data: str | list[str]) -> str:
    """`--data` as the user wrote it, for messages."""
    return data if isinstance(data, str) else " ".join(data)


class MixtureSchedule:
    """Which source the k-th micro-batch of a run comes from (see the module's docstring)."""

    def __init__(self, weights: list[float], seed: int):
        self.bounds = np.cumsum(weights)[:-1].tolist()  # slice ends; the last slice runs to 1
        self.start = float(np.random.default_rng((seed, SCHEDULE_STREAM)).random())

    def source_at(self, k: int) -> int:
        return bisect.bisect_right(self.bounds, (self.start + k * PHI) % 1.0)


class MixtureLoader:
    """Micro-batches from several sources' loaders, each batch whole from the source the schedule picks.

    `state_dict` holds every source's position and the mixture's own (this rank's micro-batches so far):
    a resumed run draws the same batches. Resuming with other sources or weights is refused.
    """

    def __init__(self, sources: list[DataSource], loaders: list[ShardLoader], *, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.sources, self.loaders = sources, loaders
        self.schedule = MixtureSchedule([s.weight for s in sources], seed)
        self.rank, self.world_size = rank, world_size
        self.position = 0
        self.kind, self.split = loaders[0].kind, loaders[0].split
        self.n_items = sum(loader.n_items for loader in loaders)

    def source_at(self, position: int) -> int:
        """The source of this rank's micro-batch number `position`."""
        return self.schedule.source_at(position * self.world_size + self.rank)

    def __iter__(self) -> Iterator[dict]:
        running: dict[int, Iterator[dict]] = {}  # started on first use: a source's prefetch thread too
        try:
            while True:
                i = self.source_at(self.position)
                if i not in running:
                    running[i] = iter(self.loaders[i])
                batch = next(running[i])
                self.position += 1
                yield batch
        finally:
            for it in running.values():
                it.close()

    def state_dict(self) -> dict:
        return {"position": self.position,
                "mixture": [{"name": s.name, "path": str(s.path.resolve()), "weight": s.weight,
                             "data": loader.data_id, "loader": loader.state_dict()}
                            for s, loader in zip(self.sources, self.loaders)]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("mixture")
        if saved is None:
            raise ValueError(f"the checkpoint trained on one --data directory and this run mixes "
                             f"{len(self.sources)} ({self._describe(self._entries())}): resume with that "
                             f"directory alone, or start anew in another --out")
        self._check_same_mixture(saved)
        for loader, entry in zip(self.loaders, saved):
            loader.load_state_dict(entry["loader"])
        self.position = int(state["position"])

    def _entries(self) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "loader"} for e in self.state_dict()["mixture"]]

    def _check_same_mixture(self, saved: list[dict]) -> None:
        """Position k means the k-th micro-batch of this schedule over these sources: the same number of
        sources, in order, each with the same weight and data (its shard checksums; its path where the
        manifest has none)."""
        mine = self._entries()
        same = len(saved) == len(mine) and all(
            math.isclose(a["weight"], b["weight"], rel_tol=1e-9)
            and (a["data"] == b["data"] if a["data"] and b["data"] else a["path"] == b["path"])
            for a, b in zip(saved, mine))
        if not same:
            raise ValueError(f"the checkpoint trained on the --data mixture {self._describe(saved)} and this run "
                             f"asks for {self._describe(mine)}: resuming would not draw the batches the checkpoint "
                             f"left off at. Resume with the same sources and weights, in the same order, or "
                             f"start anew in another --out")

    @staticmethod
    def _describe(entries: list[dict]) -> str:
        return ", ".join(f"{e['path']}:{e['weight']:.4g} (data {e['data']})" for e in entries)

    def combine(self, means: list[dict[str, float]]) -> dict[str, float]:
        """Each source's held-out means (`val_loss`, `val_ppl`, ...) logged as `<key>_<name>`, and every
        key but the perplexity (exp of the mean loss, not a mean) as the mean weighted by the mixing
        weights: the loss of the distribution the run trains on. A source with no means (`{}`: its split
        held nothing to evaluate; the engine names it) is left out, the others' weights renormalised;
        none with means gives `{}`."""
        present = [(s, m) for s, m in zip(self.sources, means) if m]
        if not present:
            return {}
        out = {f"{key}_{s.name}": value for s, m in present for key, value in m.items()}
        total = math.fsum(s.weight for s, _ in present)
        for key in present[0][1]:
            if key != "val_ppl":
                out[key] = math.fsum(s.weight * m[key] for s, m in present) / total
        return out


def mixture_manifest(sources: list[DataSource], manifests: list[dict]) -> dict:
    """One manifest for the stage and the run files: the sources' common tokenizer, their summed splits,
    and `mixture`, each source with its weight and counts. Sources tokenized with different tokenizers
    are refused, naming both (their ids mean different tokens)."""
    first, ref = sources[0], manifests[0]
    for source, manifest in zip(sources[1:], manifests[1:]):
        if manifest.get("tokenizer_fingerprint") != ref.get("tokenizer_fingerprint"):
            raise ValueError(f"--data {source.path} was tokenized with tokenizer "
                             f"{manifest.get('tokenizer_fingerprint')} and --data {first.path} with "
                             f"{ref.get('tokenizer_fingerprint')}: a mixture needs one tokenizer "
                             f"(tokenize every source with the same one)")
    kinds = list(dict.fromkeys(m["kind"] for m in manifests))
    splits = {}
    for name in dict.fromkeys(s for m in manifests for s in m["splits"]):
        parts = [m["splits"][name] for m in manifests if name in m["splits"]]
        splits[name] = {"tokens": sum(p["tokens"] for p in parts), "docs": sum(p["docs"] for p in parts),
                        "shards": [entry for p in parts for entry in p["shards"]]}
    skipped: dict[str, int] = {}
    for m in manifests:
        for reason, count in (m.get("skipped") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    tokenizer_dir = next((m["tokenizer_dir"] for m in manifests
                          if m.get("tokenizer_dir") and (Path(m["tokenizer_dir"]) / "tokenizer.json").exists()),
                         ref.get("tokenizer_dir"))
    return {"kind": "+".join(kinds), "vocab_size": max(m["vocab_size"] for m in manifests),
            "tokenizer_fingerprint": ref.get("tokenizer_fingerprint"), "tokenizer_dir": tokenizer_dir,
            "seq_len": max((m.get("seq_len") or 0) for m in manifests) or None,
            "sources": [src for m in manifests for src in m.get("sources") or []], "skipped": skipped,
            "splits": splits,
            "mixture": [{"name": s.name, "path": str(s.path.resolve()), "weight": s.weight, "kind": m["kind"],
                         "splits": {k: {"tokens": v["tokens"], "docs": v["docs"], "shards": len(v["shards"])}
                                    for k, v in m["splits"].items()}}
                        for s, m in zip(sources, manifests)]}


def describe_mixture(manifest: dict) -> str:
    """The start-up lines listing a mixture's sources."""
    lines = [f"--data mixes {len(manifest['mixture'])} sources, weights as shares of micro-batches:"]
    for s in manifest["mixture"]:
        counts = ", ".join(f"{k} {v['tokens']:,} tokens ({v['docs']:,} docs)" for k, v in s["splits"].items())
        lines.append(f"  {s['name']}: weight {s['weight']:.4g}, {s['kind']} shards in {s['path']}: {counts}")
    return "\n".join(lines)
