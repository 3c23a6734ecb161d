"""One choice of a chat completion as its tokens arrive: the text shown so far and, when the request asks
for logprobs, OpenAI's entry for each token that shows in that text.

A token's entry is handed out with the text that holds all of it, so that the chunks of a stream carry the
entries of their own tokens. A stop string cuts the text; the tokens wholly past the cut leave the logprobs
too (a token that straddles the cut stays: part of it is in the text). The stop token is in neither.
"""

from __future__ import annotations

from minimind_fast.chat import TextStream
from minimind_fast.data.tokenizer import ChatTokenizer
from minimind_fast.generation import GenerationConfig, TokenEvent

# OpenAI's stand-in for a log-probability too small to report; also keeps -inf out of JSON.
LOGPROB_FLOOR = -9999.0


def logprob_entry(tokenizer: ChatTokenizer, token: int, logprob: float) -> dict:
    """{token, logprob, bytes} of one token; `token` is its bytes as text, U+FFFD for a cut character."""
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(raw)}


def token_logprobs(tokenizer: ChatTokenizer, event: TokenEvent) -> dict:
    """The `logprobs.content` entry of a decoded token (its config asked for `top_logprobs`)."""
    scores = event.model_logprobs
    top = [logprob_entry(tokenizer, tok, lp) for tok, lp in scores.top]
    return {**logprob_entry(tokenizer, event.token, scores.logprob), "top_logprobs": top}


class Reply:
    """One choice being decoded; see the module docstring."""

    def __init__(self, tokenizer: ChatTokenizer, config: GenerationConfig):
        self.tokenizer = tokenizer
        self.stream = TextStream(tokenizer, config.stop_strings)
        self.stop_token_ids = set(config.stop_token_ids)
        self.logprobs = config.top_logprobs is not None
        self.text = ""  # handed out so far
        self.entries: list[dict] = []  # one per token pushed into `stream`
        self.sent = 0  # entries handed out so far
        self.completion_tokens = 0  # usage counts the stop token too: the model generated it
        self.finish = "length"

    def push(self, event: TokenEvent) -> tuple[str, list[dict]]:
        """The text and the logprob entries that this token releases (either may be empty)."""
        self.completion_tokens += 1
        piece = ""
        if event.token not in self.stop_token_ids and not self.stream.stopped:
            piece = self.stream.push(event.token)
            if self.logprobs:
                self.entries.append(token_logprobs(self.tokenizer, event))
        if event.finish:
            self.finish = event.finish
            piece += self.stream.finish()
        self.text += piece
        if not self.logprobs or not (piece or event.finish):  # nothing more is shown: no token is complete
            return piece, []
        end = self._covering_end() if event.finish else self._shown_end()
        released = self.entries[self.sent:end]
        self.sent = max(self.sent, end)
        return piece, released

    def _decoded(self, count: int) -> str:
        return self.tokenizer.decode(self.stream.tokens[:count])

    def _shown_end(self) -> int:
        """How many tokens the text shown so far holds whole (a token whose text is held back waits). Not the
        first count that fails: the first byte of a character decodes to U+FFFD, which the text never shows,
        yet with its other bytes it is shown."""
        shown = [end for end in range(self.sent + 1, len(self.entries) + 1)
                 if self.text.startswith(self._decoded(end))]
        return max(shown, default=self.sent)

    def _covering_end(self) -> int:
        """How many tokens the final text needs: all, unless a stop string cut it; then the fewest whose
        text reaches the cut (the tokens after them were cut away)."""
        if not self.stream.stopped:
            return len(self.entries)
        end = self.sent
        while end < len(self.entries) and not self._decoded(end).startswith(self.text):
            end += 1
        return end

    def choice(self, index: int) -> dict:
        """The non-streamed choice (call once its last token was pushed)."""
        logprobs = {"content": self.entries[:self.sent], "refusal": None} if self.logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": self.text}, "logprobs": logprobs,
                "finish_reason": self.finish}
