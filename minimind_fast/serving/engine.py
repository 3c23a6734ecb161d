"""The serving engine: one worker thread owns the model and decodes all requests together.

Requests wait in a bounded queue. At every step boundary the worker moves as many waiting requests as
there are free rows into the `Decoder` (one batched prefill), then decodes one token for every live
request (continuous batching: a request joins or leaves without waiting for the others). Tokens go
back to each request's asyncio queue on the event loop that submitted it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minimind_fast.generation import Decoder, GenerationConfig, TokenEvent

if TYPE_CHECKING:
    from minimind_fast.data.tokenizer import ChatTokenizer
    from minimind_fast.model import MiniMindForCausalLM

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine already holds its limit of waiting requests."""


@dataclass
class Handle:
    """One submitted request: the events (TokenEvent, then None; or an Exception) arrive on `events`."""

    key: int
    prompt: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def deliver(self, item: TokenEvent | Exception | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    def __init__(self, model: MiniMindForCausalLM, tokenizer: ChatTokenizer, max_batch: int = 8,
                 max_len: int | None = None, max_queue: int = 64, cuda_graph: bool = True):
        # With no row the worker would spin on a queue it can never serve.
        if max_batch < 1 or max_queue < 1 or (max_len is not None and max_len < 1):
            raise ValueError(f"max_batch ({max_batch}), max_queue ({max_queue}) and max_len ({max_len}) "
                             "must be >= 1")
        self.tokenizer = tokenizer
        self.max_len = min(max_len or model.config.max_position_embeddings,
                           model.config.max_position_embeddings)
        self.max_queue = max_queue
        self.decoder = Decoder(model, max_batch, self.max_len, tokenizer=tokenizer, cuda_graph=cuda_graph)
        self._waiting: deque[Handle] = deque()
        self._live: dict[int, Handle] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self.peak_batch = 0  # most requests decoded together so far (for monitoring and tests)
        self._thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, prompt: list[int], config: GenerationConfig) -> Handle:
        """Queue a request (call from the event loop); raises QueueFull at the queue's limit."""
        handle = Handle(next(self._ids), prompt, config, asyncio.get_running_loop())
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); retry later")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop decoding for `handle` (its client went away); the worker drops it at the next step."""
        handle.cancelled = True
        with self._cond:
            # Still waiting: leave the queue now. Otherwise it would hold its place (answering later requests
            # 503) until a row frees and the worker reaches it.
            try:
                self._waiting.remove(handle)
            except ValueError:  # already taken by the worker, or finished
                pass
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._live:
                    self._cond.wait()
                if self._stop:
                    break
                joining: list[Handle] = []
                while self._waiting and len(joining) < self.decoder.free_rows:
                    if self._waiting[0].cancelled:
                        self._waiting.popleft()
                    elif joining and not self._fit_together([*joining, self._waiting[0]]):
                        break  # padding it in would cut another's max_tokens short: it joins next step
                    else:
                        joining.append(self._waiting.popleft())
            try:
                self._drop_cancelled()
                if joining:
                    self._admit(joining)
                for event in self.decoder.step():
                    handle = self._live[event.key]
                    handle.deliver(event)
                    if event.finish:
                        del self._live[event.key]
                        handle.deliver(None)
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("generation step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _fit_together(self, handles: list[Handle]) -> bool:
        """Whether one prefill, left-padded to the longest prompt, leaves each request its max_new_tokens."""
        width = max(len(h.prompt) for h in handles)
        return all(width + h.config.max_new_tokens <= self.max_len for h in handles)

    def _admit(self, joining: list[Handle]) -> None:
        try:
            self.decoder.add_batch([h.key for h in joining], [h.prompt for h in joining],
                                   [h.config for h in joining], pad_id=self.tokenizer.pad_token_id)
        except ValueError as e:
            for h in joining:
                h.deliver(e)
            return
        for h in joining:
            self._live[h.key] = h
        self.peak_batch = max(self.peak_batch, len(self._live))

    def _drop_cancelled(self) -> None:
        for key, handle in list(self._live.items()):
            if handle.cancelled:
                self.decoder.cancel(key)
                del self._live[key]

    def _fail_all(self, error: Exception) -> None:
        for handle in self._live.values():
            handle.deliver(error)
        self._live.clear()
        self.decoder.clear()  # also rows a failed admission left behind, which would fail every later step
        with self._cond:
            while self._waiting:
                self._waiting.popleft().deliver(error)
