"""Request and response bodies of the OpenAI-compatible chat API (the subset this server implements)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from minimind_fast.chat import check_utf8
from minimind_fast.data.tokenizer import unmarked


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)  # as OpenAI: a number is not a string, nor "yes" a boolean

    # `developer` in the Literal too, so that a bad role's 400 lists every role accepted
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("role")
    @classmethod
    def developer_is_system(cls, value: str) -> str:
        """OpenAI's newer clients send the system prompt under the role `developer`."""
        return "system" if value == "developer" else value

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value: Any) -> Any:
        """Accept OpenAI's list-of-parts content when every part is text."""
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
                raise ValueError("only text content parts are supported")
            if not all(isinstance(p.get("text"), str) for p in value):
                raise ValueError("a text content part needs a string `text`")
            return "".join(p["text"] for p in value)
        return value

    @field_validator("content")
    @classmethod
    def utf8_only(cls, value: str, info: ValidationInfo) -> str:
        check_utf8(value, "content")  # a \udcXX escape: the tokenizer would fail with a 500
        if info.data.get("role") == "assistant":
            # The model may write U+FDD0, which a message may not hold (it marks quoted control-token text):
            # its reply sent back reads U+FFFD, as the chat's history keeps it, not a 400 on every later turn.
            value = unmarked(value)
        return value


class Options(BaseModel):
    """A body whose optional fields may come as null (OpenAI clients send unset options so): the default.
    Types are strict, as OpenAI's: "3" is not a number of tokens, nor "yes" or 1 a boolean."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if v is not None or k not in cls.model_fields or cls.model_fields[k].is_required()}


class StreamOptions(Options):
    include_usage: bool = False


# Options that would change the reply, which this server cannot honour: refused unless null, false or empty.
UNSUPPORTED = ("logit_bias", "response_format", "tools", "tool_choice", "functions",
               "function_call")


# Choices per request: each takes a row of the batch (or a place in the queue), so one request cannot take
# them all; 16 covers best-of-n and pass@k uses.
MAX_CHOICES = 16


class ChatCompletionRequest(Options):
    # Other unknown fields (user, metadata, ...) do not change the reply: ignored, as OpenAI-style servers do.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # extension (vLLM-style)
    repetition_penalty: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # extension
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**64 - 1)  # what torch's generators take
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=0, le=0)  # not implemented: only 0 accepted
    presence_penalty: float = Field(default=0.0, ge=0, le=0)  # not implemented: only 0 accepted
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI's range
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def refuse_what_would_be_ignored(cls, value: Any, info: ValidationInfo) -> Any:
        # "auto" picks among the tools given, and none can be: the reply is unchanged.
        harmless = (value in (False, 0, {}, [], "none", "auto")
                    or (info.field_name == "response_format" and value.get("type") == "text"))
        if not harmless:
            raise ValueError(f"{info.field_name} is not supported by this server (leave it unset, null or empty)")
        return value

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:  # as OpenAI: not silently ignored
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def reported_logprobs(self) -> int | None:
        """`GenerationConfig.top_logprobs`: None when logprobs are not asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None,
          index: int = 0, logprobs: list[dict] | None = None) -> dict:
    """A stream chunk: the delta of choice `index` (with `logprobs`, the entries of its tokens), or the usage."""
    content = {"content": logprobs, "refusal": None} if logprobs is not None else None
    choices = [] if usage_ is not None else [{"index": index, "delta": delta, "logprobs": content,
                                               "finish_reason": finish}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_param(loc: tuple) -> str | None:
    """The field an error is about, as OpenAI names it (`messages.[0].role`); None for the body as a whole."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
