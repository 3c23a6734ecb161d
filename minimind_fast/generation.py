"""Text generation over a preallocated KV cache: greedy and sampled, batched, streamed, CUDA-graphed.

`Decoder` owns a cache of `max_batch` rows x `max_len` positions, allocated once. Every row is one
sequence with its own write slot, position and sampling settings, so sequences can join (prefill into a
free row) and leave (the last live row moves into the freed one) at any step: `generate` uses it for
a batch of prompts (left-padded into one prefill), the server for continuous batching. Live rows are
kept in [0, n), so a decode step computes only those; on CUDA it can replay a CUDA graph captured per
power-of-two row count (static shapes: the cache never moves, positions and slots are tensors).

Sampling draws one uniform number per row from that row's own generator and inverts the filtered
CDF, so a seeded row samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from minimind_fast.model import MiniMindForCausalLM

if TYPE_CHECKING:
    from minimind_fast.data.tokenizer import ChatTokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.85  # 0 (or do_sample=False) means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # CTRL's penalty over prompt and generated tokens; 1 disables
    stop_token_ids: list[int] = field(default_factory=lambda: [2])
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    do_sample: bool = True
    # Report the model's log-probabilities with each token (`TokenEvent.model_logprobs`): of the chosen token
    # and of the k most likely; None computes none, so rows that do not ask cost nothing.
    top_logprobs: int | None = None

    # torch.Generator.manual_seed takes any 64-bit value, signed or not, and overflows beyond.
    SEED_RANGE = (-2**63, 2**64 - 1)
    # Sampling runs in float32: beyond these, logit / penalty overflows to inf (or the penalty itself rounds
    # to 0 or inf) and the row's probabilities turn NaN, which silently samples token 0.
    PENALTY_RANGE = (1e-30, 1e30)

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # Written so that NaN fails too: it would turn every probability into NaN and pick token 0.
        if not 0 <= self.temperature < math.inf:
            problems.append(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.PENALTY_RANGE[0] <= self.repetition_penalty <= self.PENALTY_RANGE[1]:  # NaN fails too
            problems.append(f"repetition_penalty must be in [{self.PENALTY_RANGE[0]:g}, {self.PENALTY_RANGE[1]:g}], "
                            f"got {self.repetition_penalty}")
        if self.seed is not None and not self.SEED_RANGE[0] <= self.seed <= self.SEED_RANGE[1]:
            problems.append(f"seed must fit in 64 bits, got {self.seed}")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            problems.append(f"top_logprobs must be >= 0 or None, got {self.top_logprobs}")
        if problems:
            raise ValueError("; ".join(problems))
        # "" occurs in every text: as a stop string it would end each reply at its first token.
        self.stop_strings = [s for s in self.stop_strings if s]

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    def for_prompt(self, i: int) -> GenerationConfig:
        """This config for the i-th prompt of a batch: seed + i, so that each prompt draws its own reproducible
        stream; unchanged without a seed. Wrapped as torch reads a seed, modulo 2**64 (-1 is 2**64 - 1)."""
        if self.seed is None:
            return self
        return GenerationConfig(**{**self.__dict__, "seed": (self.seed + i) % 2**64})


# ----------------------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor | float) -> torch.Tensor:
    """CTRL's rule on tokens marked in `seen` (B, V): positive logits divided by penalty, negative multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | int, top_p: torch.Tensor | float) -> torch.Tensor:
    """Set to -inf all but each row's top_k logits (0 = all), then all outside its top_p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the top token always
    stays). top_k and top_p are scalars or per-row tensors (B,).
    """
    rows, vocab = logits.shape
    top_k = torch.as_tensor(top_k, device=logits.device).expand(rows)
    top_p = torch.as_tensor(top_p, device=logits.device, dtype=logits.dtype).expand(rows)
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    rank = torch.arange(vocab, device=logits.device)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= top_p[:, None]) & (rank[None, :] > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _top_at_zero(logits: torch.Tensor) -> torch.Tensor:
    """Logits shifted so that each row's largest is 0: divided by a tiny temperature they then go to
    -inf, never to +inf (whose softmax is NaN); the distribution is unchanged."""
    return logits - logits.amax(-1, keepdim=True)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  penalty: torch.Tensor, seen: torch.Tensor | None, uniform: torch.Tensor,
                  all_greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-probability (B,), with per-row settings.

    Rows with temperature 0 take the argmax. The log-probability is under the model's own distribution
    at that temperature (before repetition penalty and top-k/top-p), which is what policy-gradient
    methods compare against. `uniform` (B,) in [0, 1) picks the sampled token from the filtered CDF.
    `all_greedy` (every temperature is 0) takes a shortcut.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logprobs = (_top_at_zero(logits) / scale).log_softmax(-1)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty[:, None])
    scaled = _top_at_zero(logits) / scale
    if all_greedy:  # skip the sort and the CDF: a few kernels less per decoding step
        tokens = scaled.argmax(-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], side="right").squeeze(-1)
    picked = picked.clamp(max=probs.shape[-1] - 1)
    # Rounding can land past the last kept token; fall back to the most likely token there.
    picked = torch.where(probs.gather(-1, picked[:, None]).squeeze(-1) > 0, picked, probs.argmax(-1))
    tokens = torch.where(greedy, scaled.argmax(-1), picked)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


# -------------------------------------------------------------------------------------------- cache

class SlotKVCache:
    """Keys and values (layers, rows, max_len, kv_heads, head_dim), preallocated; one write slot per row.

    The model's attention calls `attend`: it writes the new keys of row b at slot[b] + [0, T) and
    lets each query see the keys of its row at or before its own slot that `key_padding_mask` marks
    real (False = left padding). `span` limits attention to the first `span` slots (eager decoding);
    None attends over all of max_len, which keeps shapes fixed for CUDA graphs.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, key_padding_mask: torch.Tensor):
        self.k, self.v, self.slot, self.key_padding_mask = k, v, slot, key_padding_mask
        self.max_len = k.shape[2]
        self.span: int | None = None
        self.length = 0  # the model advances this; slots, not length, place the keys here

    @classmethod
    def allocate(cls, model: MiniMindForCausalLM, rows: int, max_len: int) -> SlotKVCache:
        cfg = model.config
        param = next(model.parameters())
        shape = (cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim)
        try:
            return cls(torch.zeros(shape, device=param.device, dtype=param.dtype),
                       torch.zeros(shape, device=param.device, dtype=param.dtype),
                       torch.zeros(rows, dtype=torch.long, device=param.device),
                       torch.ones(rows, max_len, dtype=torch.bool, device=param.device))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            size = 2 * math.prod(shape) * param.element_size() / 2**30
            raise ValueError(f"the KV cache for {rows} rows of {max_len} positions needs {size:.1f} GiB on "
                             f"{param.device}, more than it has: lower the batch (--max-batch) or the context "
                             "(--max-len)") from None

    def rows(self, start: int, stop: int, span: int | None = None) -> SlotKVCache:
        """A view of rows [start, stop) sharing this cache's memory."""
        view = SlotKVCache(self.k[:, start:stop], self.v[:, start:stop], self.slot[start:stop],
                           self.key_padding_mask[start:stop])
        view.span = span
        return view

    def move_row(self, src: int, dst: int) -> None:
        for t in (self.k, self.v):
            t[:, dst] = t[:, src]
        self.slot[dst] = self.slot[src]
        self.key_padding_mask[dst] = self.key_padding_mask[src]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows, tq = q.shape[:2]
        slots = self.slot[:, None] + torch.arange(tq, device=q.device)  # (rows, tq)
        index = slots[:, :, None, None].expand_as(k)
        keys, values = self.k[layer], self.v[layer]
        keys.scatter_(1, index, k)
        values.scatter_(1, index, v)
        span = self.span or self.max_len
        key_pos = torch.arange(span, device=q.device)
        mask = (key_pos[None, None, :] <= slots[:, :, None]) & self.key_padding_mask[:, None, :span]
        # A left-padding query has no real key before it; letting it see itself keeps it finite.
        mask = mask | (key_pos[None, None, :] == slots[:, :, None])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[:, :span].transpose(1, 2), values[:, :span].transpose(1, 2),
            attn_mask=mask[:, None], enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------ decoder

def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
    return generator


class TokenLogprobs(NamedTuple):
    """The model's log-probabilities at one step: the log-softmax of its raw logits, before temperature,
    repetition penalty and top-k/top-p (what the model predicts, whatever the sampling settings)."""

    logprob: float  # of the chosen token
    top: list[tuple[int, float]]  # the k most likely (token, logprob), most likely first


class TokenEvent(NamedTuple):
    """One new token of the sequence `key`; `finish` is None, "stop" (stop token/string) or "length".

    `logprob` is under the sampling temperature (what RL compares against); `model_logprobs` is set only
    for a sequence whose config asks for `top_logprobs`."""

    key: Hashable
    token: int
    logprob: float
    finish: str | None
    model_logprobs: TokenLogprobs | None = None


@dataclass
class _Row:
    key: Hashable
    config: GenerationConfig
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)


def has_stop_string(tokenizer: ChatTokenizer, tokens: list[int], stop_strings: list[str]) -> bool:
    """Whether the text of `tokens` contains a stop string, decoding only a tail long enough to hold the
    longest: 4 tokens a character (byte tokens), widened while special tokens (which decode to nothing)
    leave it short."""
    longest = max(len(s) for s in stop_strings)
    n = 4 * longest + 4
    tail = tokenizer.decode(tokens[-n:])
    while len(tail) <= longest and n < len(tokens):  # one more char: the first may be a cut one
        n *= 2
        tail = tokenizer.decode(tokens[-n:])
    return any(s in tail for s in stop_strings)


class Decoder:
    """Sequences decoded together over one preallocated `SlotKVCache`; see the module docstring."""

    def __init__(self, model: MiniMindForCausalLM, max_batch: int, max_len: int, *,
                 tokenizer: ChatTokenizer | None = None, cuda_graph: bool = True):
        limit = model.config.max_position_embeddings
        if max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {limit}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_len = max_batch, max_len
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache.allocate(model, max_batch, max_len)
        dev, vocab = self.device, model.config.vocab_size
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # position id of the next input
        self.last = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # the next input token
        self.logits = torch.zeros(max_batch, vocab, dtype=torch.float32, device=dev)  # pending, per live row
        self.seen: torch.Tensor | None = None  # (max_batch, V) bool, made when a row needs a penalty
        self.params = torch.zeros(4, max_batch, dtype=torch.float32, device=dev)  # temp, top_k, top_p, penalty
        self.live: list[_Row] = []
        self.slots_used = [0] * max_batch  # host copy of cache.slot, so eager steps know their span
        self.cuda_graph = cuda_graph and self.device.type == "cuda" and not model.config.use_moe
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.signature: tuple | None = None

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.live)

    # ------------------------------------------------------------------ joining
    def add(self, key: Hashable, prompt: list[int], config: GenerationConfig) -> None:
        """Prefill `prompt` into a free row; its first token comes with the next `step`."""
        self.add_batch([key], [prompt], [config])

    @torch.inference_mode()
    def add_batch(self, keys: list[Hashable], prompts: list[list[int]], configs: list[GenerationConfig],
                  pad_id: int = 0) -> None:
        """Prefill several prompts in one left-padded forward pass into free rows."""
        if len(prompts) > self.free_rows:
            raise RuntimeError(f"{len(prompts)} prompts but only {self.free_rows} free rows")
        width = max((len(p) for p in prompts), default=0)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty (needs at least one token)")
            # Every row's slots start after the left padding: the longest prompt counts for all.
            if width + configs[i].max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens (left-padded to {width}) + max_new_tokens "
                                 f"{configs[i].max_new_tokens} exceeds the context length {self.max_len}")
        # Seeded before any row changes, so that a refused seed leaves the decoder as it was.
        generators = [_generator(config.seed) for config in configs]
        start = len(self.live)
        stop = start + len(prompts)
        ids, real, positions = self._prefill(start, prompts, width, pad_id)
        self.cache.slot[start:stop] = width
        self.positions[start:stop] = positions[:, -1:] + 1
        for i, (key, config, generator) in enumerate(zip(keys, configs, generators)):
            row = start + i
            self.slots_used[row] = width
            self.params[:, row] = torch.tensor([config.temperature if not config.greedy else 0.0,
                                                config.top_k, config.top_p, config.repetition_penalty])
            if config.repetition_penalty != 1.0 and self.seen is None:
                self.seen = torch.zeros(self.max_batch, self.logits.shape[1], dtype=torch.bool,
                                        device=self.device)
            if self.seen is not None:
                self.seen[row] = False
                self.seen[row, ids[i][real[i]]] = True
            self.live.append(_Row(key, config, generator))

    def _prefill(self, start: int, prompts: list[list[int]], width: int, pad_id: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the model over the prompts, left-padded to `width`, into rows start.. of the cache and
        `self.logits`; return the (rows, width) ids, real-token mask and positions.

        A prompt repeated in the batch (GRPO's group, a request's `n` choices) is run once: its keys,
        values and logits are copied to the other rows, so prefill costs the distinct prompts only."""
        distinct: dict[tuple[int, ...], int] = {}
        order = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=self.device)
        ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(distinct), width), dtype=torch.bool)
        for i, p in enumerate(distinct):
            ids[i, width - len(p):] = torch.tensor(p)
            real[i, width - len(p):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        cache, ran = self.cache, start + len(distinct)
        cache.slot[start:ran] = 0
        cache.key_padding_mask[start:ran] = True
        cache.key_padding_mask[start:ran, :width] = real
        logits = self.model(ids, position_ids=positions, kv_cache=cache.rows(start, ran, span=width),
                            logits_to_keep=1).logits[:, -1]
        stop = start + len(prompts)
        if len(distinct) < len(prompts):
            # Indexing copies first, so rows may read what they then overwrite.
            for t in (cache.k, cache.v):
                t[:, start:stop, :width] = t[:, start + order, :width]
            cache.key_padding_mask[start:stop] = cache.key_padding_mask[start + order]
            ids, real, positions, logits = ids[order], real[order], positions[order], logits[order]
        self.logits[start:stop] = logits.float()
        return ids, real, positions

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Sample one token for every live row, retire finished rows, and run the model on the rest."""
        n = len(self.live)
        if n == 0:
            return []
        p = self.params[:, :n]
        all_greedy = all(r.config.greedy for r in self.live)
        uniform = torch.tensor([0.0 if r.config.greedy else float(torch.rand(1, generator=r.generator))
                                for r in self.live], device=self.device)
        seen = self.seen[:n] if self.seen is not None else None
        tokens, logprobs = sample_tokens(self.logits[:n], p[0], p[1].long(), p[2], p[3], seen, uniform,
                                         all_greedy)
        reported = self._model_logprobs(tokens)  # before retiring and the forward move or overwrite logits
        events, finished = [], []
        for i, (row, tok, lp) in enumerate(zip(self.live, tokens.tolist(), logprobs.tolist())):
            row.tokens.append(tok)
            finish = self._finish_reason(i, row, tok)
            events.append(TokenEvent(row.key, tok, lp, finish, reported[i]))
            if finish:
                finished.append(i)
        self.last[:n, 0] = tokens
        if self.seen is not None:
            self.seen[torch.arange(n, device=self.device), tokens] = True
        for i in reversed(finished):
            self._retire(i)
        if self.live:
            self._forward()
        return events

    def _model_logprobs(self, tokens: torch.Tensor) -> list[TokenLogprobs | None]:
        """`TokenLogprobs` of the rows whose config asks for them (None for the others).

        Only those rows pay for the log-softmax and the top-k, in one batched call and one host sync.
        """
        asked = [i for i, row in enumerate(self.live) if row.config.top_logprobs is not None]
        reported: list[TokenLogprobs | None] = [None] * len(self.live)
        if not asked:
            return reported
        index = torch.tensor(asked, device=self.device)
        logprobs = self.logits[index].log_softmax(-1)
        chosen = logprobs.gather(-1, tokens[index, None]).squeeze(-1).tolist()
        k = min(max(self.live[i].config.top_logprobs for i in asked), logprobs.shape[-1])
        values, ids = logprobs.topk(k, dim=-1)  # sorted, most likely first
        values, ids = values.tolist(), ids.tolist()
        for j, i in enumerate(asked):
            wanted = self.live[i].config.top_logprobs
            reported[i] = TokenLogprobs(chosen[j], list(zip(ids[j][:wanted], values[j][:wanted])))
        return reported

    # In inference mode as `step`: retiring a row writes into the tensors made there (the penalty's `seen`),
    # which outside it raises (the server cancels between steps).
    @torch.inference_mode()
    def clear(self) -> None:
        """Drop every live sequence (e.g. after a consumer stopped iterating half-way)."""
        while self.live:
            self._retire(len(self.live) - 1)

    @torch.inference_mode()
    def cancel(self, key: Hashable) -> None:
        """Drop the sequence `key` (e.g. its client went away)."""
        for i, row in enumerate(self.live):
            if row.key == key:
                self._retire(i)
                return

    def _finish_reason(self, i: int, row: _Row, tok: int) -> str | None:
        cfg = row.config
        if tok in cfg.stop_token_ids:
            return "stop"
        if cfg.stop_strings and self.tokenizer is not None and has_stop_string(self.tokenizer, row.tokens,
                                                                                 cfg.stop_strings):
            return "stop"
        if len(row.tokens) >= cfg.max_new_tokens or self.slots_used[i] >= self.max_len:
            return "length"
        return None

    def _retire(self, i: int) -> None:
        """Free row i by moving the last live row into it, so live rows stay in [0, n)."""
        last = len(self.live) - 1
        if i != last:
            self.cache.move_row(last, i)
            for t in (self.positions, self.last, self.logits):
                t[i] = t[last]
            self.params[:, i] = self.params[:, last]
            if self.seen is not None:
                self.seen[i] = self.seen[last]
            self.slots_used[i] = self.slots_used[last]
            self.live[i] = self.live[last]
        self.live.pop()
        self.cache.slot[last] = 0  # an idle row in a graph replay writes harmlessly at slot 0
        self.slots_used[last] = 0

    def _forward(self) -> None:
        n = len(self.live)
        if self.cuda_graph:
            bucket = min(1 << (n - 1).bit_length(), self.max_batch)
            try:
                self.logits[:n] = self._graph(bucket)[:n]
            except RuntimeError as e:  # an op that cannot be captured: decode eagerly from now on
                warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly", stacklevel=2)
                self.cuda_graph = False
                self._graphs.clear()
        if not self.cuda_graph:
            span = max(self.slots_used[:n]) + 1
            out = self.model(self.last[:n], position_ids=self.positions[:n],
                             kv_cache=self.cache.rows(0, n, span=span)).logits[:, -1]
            self.logits[:n] = out.float()
        self.cache.slot[:n] += 1
        self.positions[:n] += 1
        for i in range(n):
            self.slots_used[i] += 1

    def _graph(self, rows: int) -> torch.Tensor:
        """Replay (capturing on first use) the decode step of the first `rows` rows as a CUDA graph."""
        if rows not in self._graphs:
            view = self.cache.rows(0, rows)

            def decode() -> torch.Tensor:
                return self.model(self.last[:rows], position_ids=self.positions[:rows],
                                  kv_cache=view).logits[:, -1].float()

            # Warm up on a side stream (as CUDA graph capture requires); the writes land in the slot that
            # the replay overwrites first, and positions/slots are not advanced by the model.
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    decode()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = decode()
            self._graphs[rows] = (graph, out)
        graph, out = self._graphs[rows]
        graph.replay()
        return out


# ------------------------------------------------------------------------------------- entry points

def _normalise(prompts: list[int] | list[list[int]]) -> tuple[list[list[int]], bool]:
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)], True
    if not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("prompts must be a list of token ids or a non-empty list of such lists")
    return [list(p) for p in prompts], False


# One decoder per model is kept while graphs are in use, so that later calls replay the graphs already
# captured instead of capturing again (the cache is sized up to a multiple of 256 positions to fit more).
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder_for(model: MiniMindForCausalLM, rows: int, max_len: int, cuda_graph: bool) -> Decoder:
    on_cuda = next(model.parameters()).device.type == "cuda"
    if not (cuda_graph and on_cuda):
        return Decoder(model, rows, max_len, cuda_graph=False)
    kept = _DECODERS.get(model)
    param = next(model.parameters())
    signature = (param.data_ptr(), param.dtype)  # graphs read the weights where they were captured
    if (kept is not None and kept.max_batch >= rows and kept.max_len >= max_len and not kept.live
            and kept.signature == signature):
        return kept
    room = model.config.max_position_embeddings
    decoder = Decoder(model, rows, min(-(-max_len // 256) * 256, room), cuda_graph=True)
    decoder.signature = signature
    _DECODERS[model] = decoder
    return decoder


def stream_generate(model: MiniMindForCausalLM, prompts: list[int] | list[list[int]],
                    config: GenerationConfig, *, pad_id: int = 0, tokenizer: ChatTokenizer | None = None,
                    return_logprobs: bool = False, cuda_graph: bool = True) -> Iterator:
    """Yield the new tokens of every step as they are produced.

    For a single prompt (a list of ids) each item is a token id; for a batch it is a list with one
    entry per prompt, None once that prompt has finished. With return_logprobs each token is a
    (token, logprob) pair. The token that ended a sequence (a stop token) is yielded too.
    Stop strings need `tokenizer`. On CUDA the decode step replays a CUDA graph (dense models) unless
    cuda_graph=False; the decoder and its graphs are kept per model for the next call.
    """
    batch, single = _normalise(prompts)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    width = max(len(p) for p in batch)
    limit = model.config.max_position_embeddings
    if width + config.max_new_tokens > limit:
        raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                         f"context length {limit}")
    decoder = _decoder_for(model, len(batch), width + config.max_new_tokens, cuda_graph)
    decoder.tokenizer = tokenizer
    configs = [config.for_prompt(i) for i in range(len(batch))]
    decoder.add_batch(list(range(len(batch))), batch, configs, pad_id=pad_id)
    try:
        while decoder.live:
            step: list = [None] * len(batch)
            for ev in decoder.step():
                step[ev.key] = (ev.token, ev.logprob) if return_logprobs else ev.token
            yield step[0] if single else step
    finally:
        decoder.clear()


def generate(model: MiniMindForCausalLM, prompts: list[list[int]], config: GenerationConfig, *,
             pad_id: int = 0, tokenizer: ChatTokenizer | None = None, return_logprobs: bool = False,
             keep_stop_token: bool = False, cuda_graph: bool = True,
             ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New tokens of every prompt (with `return_logprobs`, also their log-probabilities).

    The stop token that ended a sequence is left out unless keep_stop_token (RL wants it scored).
    """
    batch, _ = _normalise(prompts)
    tokens: list[list[int]] = [[] for _ in batch]
    logprobs: list[list[float]] = [[] for _ in batch]
    stops = set(config.stop_token_ids)
    for step in stream_generate(model, batch, config, pad_id=pad_id, tokenizer=tokenizer,
                                return_logprobs=True, cuda_graph=cuda_graph):
        for i, item in enumerate(step):
            if item is not None and (keep_stop_token or item[0] not in stops):
                tokens[i].append(item[0])
                logprobs[i].append(item[1])
    return (tokens, logprobs) if return_logprobs else tokens
