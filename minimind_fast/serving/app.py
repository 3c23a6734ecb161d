"""The OpenAI-compatible HTTP API: `/v1/chat/completions` (plain and server-sent events) and `/v1/models`.

Errors come back as `{"error": {"message": ...}}`: 400 for bad JSON, bad fields, an unknown model or
more tokens than the context holds; 503 when the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind_fast.chat import chat_prompt
from minimind_fast.generation import GenerationConfig, TokenEvent
from minimind_fast.serving import schemas
from minimind_fast.serving.engine import Engine, Handle, QueueFull
from minimind_fast.serving.replies import Reply


def create_app(engine: Engine, model_name: str, default_max_tokens: int = 512) -> FastAPI:
    """The API over a started `engine`; `model_name` is the only model id it accepts."""
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
    app = FastAPI(title="minimind_fast", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(schemas.error_body(str(exc.detail), kind, getattr(exc, "param", None)),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(schemas.error_body(str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug's 500 still in the error shape OpenAI clients parse (uvicorn logs the traceback).
        return JSONResponse(schemas.error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minimind_fast"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "waiting": engine.queue_length}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request)
        if body.model != model_name:
            raise HTTPException(400, f"unknown model {body.model!r}; this server serves {model_name!r}")
        try:
            prompt = chat_prompt(tokenizer, [m.model_dump() for m in body.messages])
        except ValueError as e:  # the model's chat template refuses these messages (e.g. their order)
            raise HTTPException(400, f"messages: {e}") from None
        room = engine.max_len - len(prompt)
        limit = body.token_limit
        if room < 1:
            raise HTTPException(400, f"the messages take {len(prompt)} tokens, the context holds {engine.max_len}")
        if limit is not None and limit > room:
            raise HTTPException(400, f"max_tokens {limit} + {len(prompt)} prompt tokens exceeds the context "
                                     f"length {engine.max_len}")
        if body.n > engine.max_queue:  # it could never be queued whole
            raise HTTPException(400, f"n {body.n} exceeds the server's queue of {engine.max_queue} requests")
        configs = choice_configs(body, limit or min(default_max_tokens, room), tokenizer.eos_token_id)
        handles = submit_all(engine, prompt, configs)
        replies = [Reply(tokenizer, c) for c in configs]
        cid = schemas.completion_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(engine, handles, replies, cid, model_name, len(prompt), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not await collect_unless_disconnected(engine, handles, replies, request):
            return Response(status_code=499)  # nobody reads it; nginx's code for a closed client request
        choices = [reply.choice(i) for i, reply in enumerate(replies)]
        return schemas.completion(cid, model_name, choices, usage(len(prompt), replies))

    return app


async def parse_body(request: Request) -> schemas.ChatCompletionRequest:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's own limit, hit by arrays or objects nested thousands deep
        raise HTTPException(400, "request body is not valid JSON: nested too deeply") from None
    try:
        return schemas.ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors())
        raise BadRequest(f"invalid request: {problems}", schemas.error_param(e.errors()[0]["loc"])) from None


class BadRequest(HTTPException):
    """A 400 about one field of the body: `param` names it in the error, as OpenAI's do."""

    def __init__(self, detail: str, param: str | None):
        super().__init__(400, detail)
        self.param = param


def choice_configs(body: schemas.ChatCompletionRequest, max_new_tokens: int, eos_id: int) -> list[GenerationConfig]:
    """The sampling settings of each of the `n` choices; a 400 for what sampling cannot take."""
    try:  # the schema checks most fields; GenerationConfig has the last word on what sampling can take
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, stop_token_ids=[eos_id], stop_strings=body.stop_strings,
            seed=body.seed, top_logprobs=body.reported_logprobs)
    except ValueError as e:
        raise HTTPException(400, f"invalid request: {e}") from None
    # Choice i samples with seed + i (mod 2**64): each reproducible alone, none a copy of another.
    return [config.for_prompt(i) for i in range(body.n)]


def submit_all(engine: Engine, prompt: list[int], configs: list[GenerationConfig]) -> list[Handle]:
    """One engine request per choice (they decode in the same batch). If the queue cannot take them all, those
    already queued are withdrawn and the request gets a 503: no choice decodes for a reply never sent."""
    handles: list[Handle] = []
    try:
        for config in configs:
            handles.append(engine.submit(prompt, config))
    except QueueFull as e:
        for handle in handles:
            engine.cancel(handle)
        raise HTTPException(503, str(e)) from None
    return handles


def usage(prompt_tokens: int, replies: list[Reply]) -> dict:
    """The prompt is read once for all choices; each choice's tokens count."""
    return schemas.usage(prompt_tokens, sum(r.completion_tokens for r in replies))


async def events(handles: list[Handle]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, token event) of all requests as they come, until each finishes; the engine's errors
    are raised here."""
    pending = {asyncio.ensure_future(h.events.get()): i for i, h in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):  # choices of one step in index order
                i = pending.pop(future)
                item = future.result()
                if isinstance(item, Exception):
                    raise HTTPException(500, f"generation failed: {item}")
                if item is not None:
                    yield i, item
                    pending[asyncio.ensure_future(handles[i].events.get())] = i
    finally:
        for future in pending:  # a cancelled get takes nothing off its queue
            future.cancel()


async def collect(handles: list[Handle], replies: list[Reply]) -> None:
    async with aclosing(events(handles)) as stream:  # a cancelled collect leaves no queue read pending
        async for i, event in stream:
            replies[i].push(event)


async def collect_unless_disconnected(engine: Engine, handles: list[Handle], replies: list[Reply],
                                      request: Request) -> bool:
    """`collect`; False as soon as the client goes away. Either way the requests' rows are freed.

    Unlike a StreamingResponse, a plain endpoint is not cancelled when its client disconnects, so the
    rows would otherwise decode to max_tokens for nobody.
    """
    reply = asyncio.ensure_future(collect(handles, replies))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not reply.done():
            reply.cancel()
        for handle in handles:
            engine.cancel(handle)  # a no-op when it finished
    if reply.done() and not reply.cancelled():
        reply.result()  # the engine's error, if any, as its 500
        return True
    return False


async def disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse(engine: Engine, handles: list[Handle], replies: list[Reply], cid: str, model: str,
              prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The choices' chunks interleaved as their tokens come, each naming its choice's index."""
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for i in range(len(replies)):
            yield event(schemas.chunk(cid, model, {"role": "assistant", "content": ""}, index=i))
        try:
            async with aclosing(events(handles)) as stream:  # a client gone mid-stream leaves no read pending
                async for i, token in stream:
                    reply = replies[i]
                    piece, entries = reply.push(token)
                    if piece or entries:
                        logprobs = entries if reply.logprobs else None
                        yield event(schemas.chunk(cid, model, {"content": piece}, index=i, logprobs=logprobs))
                    if token.finish:
                        yield event(schemas.chunk(cid, model, {}, reply.finish, index=i))
        except HTTPException as e:  # headers are gone: report the failure in the stream
            yield event(schemas.error_body(str(e.detail), "server_error"))
            return
        if include_usage:
            yield event(schemas.chunk(cid, model, {}, usage_=usage(prompt_tokens, replies)))
        yield "data: [DONE]\n\n"
    finally:
        for handle in handles:
            engine.cancel(handle)  # the client went away mid-stream: free the rows


class ServerThread:
    """uvicorn serving `app` from a background thread (tests, notebooks); `stop()` shuts it down."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model loads: a port in use, a bad port or an unknown
    host is then an error at once (uvicorn found it only after loading, and exited with its own log)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {port}")
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind((host, port))
    except OSError as e:
        if sock is not None:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(engine: Engine, model_name: str, sock: socket.socket, default_max_tokens: int = 512) -> None:
    """Run the API on `sock` (`listen_socket`) in the foreground until interrupted, then stop the engine."""
    app = create_app(engine, model_name, default_max_tokens)
    config = uvicorn.Config(app, log_level="info")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
