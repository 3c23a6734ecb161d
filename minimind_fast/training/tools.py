"""Tool use in RL rollouts (`--tools`): the tools module, the calls a model writes, running them, and the
multi-turn rollout that GRPO and PPO sample.

The tools module (`--tools FILE.py` or `--tools pkg.module`) is plain Python: each public function defined
in it (not imported into it, name not starting with `_`) is a tool of that name. A call's JSON `arguments`
object is passed as keyword arguments; the return value, a str as is or anything else as JSON, is the
content of the `tool` message that answers the call, cut to `RESULT_CHARS` characters (a lone surrogate,
as os.fsdecode gives for bytes that are not UTF-8, read as U+FFFD). A call that cannot
run (not JSON, an unknown tool, arguments that do not fit the function's signature) or that raises or
outlives `--tool-timeout`, or that comes after `--max-tool-calls` calls in its turn (not run), is answered
with `{"error": "..."}` instead, which the model reads and learns from: a tool never stops the run. A
module that cannot be imported, or a prompt declaring a tool that the module lacks, is refused at start-up.
The module runs in the training process: it is your code.

Calls are parsed the way MiniMind-3's chat template writes them (Qwen's layout):
`<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>`, any number per turn.

A rollout (`Episode`) is the prompt's tokens, then the model's first turn through its stop token, then
the template's tokens that answer its calls (the rest of the assistant turn, the `tool` messages, the
next generation prompt), then the next turn, and so on: until a turn calls no tool, `--max-turns` turns,
or `--seq-len` tokens. Only the sampled tokens carry the loss. The tokens between turns are the
difference between two renderings of the conversation (before and after the tool messages), appended
to what the model actually saw, never a re-encoding of the whole conversation: a template that
re-renders an earlier turn otherwise (normalised JSON, thinking stripped) or a tokenization that differs
from the sampled one would otherwise make the training sequence disagree with the context each turn was
sampled in. Every turn's context is thus a prefix of the final sequence. Those tokens are encoded as the
shards encode a conversation: a tool result that spells a control token (`<|im_end|>`) is text, not a turn.

The timeout is SIGALRM (`setitimer`), which interrupts a stuck Python function in the main thread,
where the engine samples; a watchdog thread could only stop waiting for it and leave it running. It
raises `ToolTimeout`, a BaseException, so that a tool's own `except Exception` does not swallow it. It
cannot interrupt C code that does not return to the interpreter (a long regex, a socket without a
timeout), and tools must leave SIGALRM alone. Exact resume needs deterministic tools: a tool that reads
the clock, the network or its own state, or that times out, samples another continuation after a resume.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minimind_fast.data.pipeline import doc_ids
from minimind_fast.data.records import TOOL_FIELDS, Doc, conversation_field, conversation_tools, map_strings, marked_doc
from minimind_fast.data.tokenizer import ChatTokenizer, unmarked

RESULT_CHARS = 2000  # a tool message's content at most: a huge result would fill the sequence budget
# Calls run per turn at most (--max-tool-calls' default): a turn of hundreds would run them all, each for up
# to --tool-timeout; the rest are answered with an error
DEFAULT_MAX_CALLS = 8
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# A call block; an opening tag inside a block ends no block of its own, so it is an unclosed call.
CALL_BLOCK = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)
PROBE = "probe result 7f3a"  # the tool result the start-up check renders


# ----------------------------------------------------------------------------------- parsing calls

@dataclass
class ToolCall:
    name: str | None
    arguments: dict | None
    problem: str | None = None  # why it cannot run (not JSON, no name, arguments not an object)


def _read_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except ValueError as e:
        return ToolCall(None, None, f"the tool call is not JSON ({e.msg} at column {e.colno}): {body[:200]!r}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCall(None, None, 'a tool call is a JSON object {"name": "...", "arguments": {...}}')
    name, args = obj["name"], obj.get("arguments")
    if isinstance(args, str):  # the object quoted as a string, as OpenAI's API carries it
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCall(name, None, f"the arguments of {name} must be a JSON object, got {json.dumps(args)[:200]}")
    return ToolCall(name, args)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The calls in a turn's text, in order, and the text without the well-formed ones (the reply's content).

    A block that does not parse stays in the content and comes back as a call with a `problem`, as does
    an opening tag never closed: the model is answered with an error rather than ignored.
    """
    calls, content, pos = [], [], 0
    for m in CALL_BLOCK.finditer(text):
        call = _read_call(m.group(1).strip())
        calls.append(call)
        if call.problem is None:
            content.append(text[pos:m.start()])
            pos = m.end()
    content.append(text[pos:])
    unclosed = text.count(OPEN) - len(calls)
    calls += [ToolCall(None, None, f"{OPEN} without its {CLOSE}") for _ in range(unclosed)]
    return "".join(content).strip(), calls


def assistant_message(content: str, calls: list[ToolCall]) -> dict:
    """A turn as a chat message, its well-formed calls in OpenAI's `tool_calls` (what templates render)."""
    message = {"role": "assistant", "content": content}
    good = [c for c in calls if c.problem is None]
    if good:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in good]
    return message


def definition_name(definition: dict) -> str | None:
    """The function name of a tool definition (OpenAI nests it under "function")."""
    fn = definition.get("function") if isinstance(definition.get("function"), dict) else definition
    name = fn.get("name")
    return name if isinstance(name, str) and name else None


# ----------------------------------------------------------------------------------- running calls

class ToolTimeout(BaseException):
    """Raised inside a tool by SIGALRM (a BaseException: a tool's `except Exception` must not swallow it)."""


def _raise_timeout(signum, frame) -> None:
    raise ToolTimeout


def call_with_timeout(fn: Callable, kwargs: dict, seconds: float):
    """fn(**kwargs), interrupted by ToolTimeout after `seconds` (0: never). Main thread only (SIGALRM)."""
    if seconds <= 0:
        return fn(**kwargs)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(**kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def check_timeout_support(seconds: float) -> None:
    """Refuse at start-up a timeout this process cannot enforce (see the module docstring)."""
    if seconds > 0 and not (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()):
        raise ValueError(f"--tool-timeout {seconds:g} needs SIGALRM in the main thread, which this platform or "
                         f"thread lacks: pass --tool-timeout 0 (no timeout)")
    if seconds > 0:
        try:  # a trial: beyond its range (2**63 ns on Linux) setitimer raises at every call, blaming the tool
            call_with_timeout(lambda: None, {}, seconds)
        except ToolTimeout:  # so short that it fired already
            pass
        except OverflowError:
            raise ValueError(f"--tool-timeout {seconds:g} is longer than this platform's timer can wait: pass a "
                             f"shorter one, or 0 (no timeout)") from None


def _encodable(text: str) -> str:
    """`text` with each lone surrogate as U+FFFD, as a decoder shows bytes it cannot read: a file name that is
    not UTF-8 comes back from os.listdir or os.fsdecode with them, and a model may write one as a JSON escape
    that a tool echoes, but the tokenizer cannot encode them (the run stopped). U+FDD0 (`records.MARK`, which
    tells quoted control-token text from the template's) reads U+FFFD too."""
    text = unmarked(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _error(message: str) -> str:
    return _encodable(json.dumps({"error": message[:RESULT_CHARS]}, ensure_ascii=False))


def _result_text(name: str, value) -> tuple[str, bool]:
    if isinstance(value, str):
        return _encodable(value[:RESULT_CHARS]), False
    try:
        return _encodable(json.dumps(value, ensure_ascii=False)[:RESULT_CHARS]), False
    except (TypeError, ValueError) as e:
        return _error(f"{name} returned a {type(value).__name__}, which is not a str nor JSON ({e})"), True


def _failure_line(error: BaseException, path: str | None) -> str:
    """'file:line' of the innermost frame of `error` in `path` (the user's file), else of the innermost."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if path and Path(f.filename) == Path(path)] or frames
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else str(path)


def import_user_module(spec: str, named: str) -> tuple[object, Path | None]:
    """The module `spec` names (a path ending in .py, or pkg.module) and its source file, for a flag that
    takes the user's code; a ValueError starting with `named` (the flag and its value, e.g. `--tools t.py`)
    and saying where an import fails."""
    where = None
    try:
        if spec.endswith(".py"):
            where = Path(spec)
            if not where.is_file():
                raise ValueError(f"{named}: no such file {spec}")
            found = importlib.util.spec_from_file_location(f"_user_{where.stem}", where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        elif "/" in spec or Path(spec).is_file():  # a file's path: a module name has neither
            raise ValueError(f"{named}: {spec} is not a .py file (give a path ending in .py, or pkg.module)")
        else:
            found = importlib.util.find_spec(spec)
            if found is None:
                raise ValueError(f"{named}: no module {spec!r} (give pkg.module or a path ending in .py)")
            where = Path(found.origin) if found.origin else None
            module = importlib.import_module(spec)
    except ValueError:
        raise
    except SyntaxError as e:
        raise ValueError(f"{named}: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:
        raise ValueError(f"{named}: importing {spec} raised {type(e).__name__}: {e} (at "
                         f"{_failure_line(e, str(where) if where else None)})") from None
    source = getattr(module, "__file__", None)
    return module, Path(source) if source else None


def _import(spec: str) -> tuple[object, Path]:
    """The tools module and its source file, which a resume's fingerprint reads."""
    module, source = import_user_module(spec, f"--tools {spec}")
    if source is None or not source.is_file():
        raise ValueError(f"--tools {spec}: a module without a source file cannot be fingerprinted for resume")
    return module, source


class Toolbox:
    """The tools of a run: a module's public functions, called by name with a call's arguments."""

    def __init__(self, spec: str, timeout: float, max_calls: int = DEFAULT_MAX_CALLS):
        module, source = _import(spec)
        self.spec, self.timeout, self.max_calls = spec, timeout, max_calls
        self.functions = {name: fn for name, fn in vars(module).items()
                          if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == module.__name__}
        if not self.functions:
            raise ValueError(f"--tools {spec}: {source} defines no public function (each function it defines, "
                             f"name not starting with _, is a tool)")
        asynchronous = [name for name, fn in self.functions.items() if inspect.iscoroutinefunction(fn)]
        if asynchronous:  # calling one returns a coroutine that nothing would run
            raise ValueError(f"--tools {spec}: {asynchronous[0]} is async; tools are plain functions")
        self.signatures = {name: inspect.signature(fn) for name, fn in self.functions.items()}
        self.fingerprint = hashlib.sha256(source.read_bytes()).hexdigest()[:16]

    def check_declared(self, records: list, source: str) -> None:
        """Refuse a prompt (a `PromptRecord`) whose tool definitions name a function the module lacks: the
        model would be offered a tool whose every call fails."""
        for r in records:
            key = conversation_field(r.sample)
            for i, m in enumerate(r.messages):
                for tools_key in TOOL_FIELDS:
                    for j, d in enumerate((m.get(tools_key) or []) if m["role"] == "system" else []):
                        name, where = definition_name(d), f"{source}:{r.line}: '{key}'[{i}].{tools_key}[{j}]"
                        if name is None:
                            raise ValueError(f'{where} has no function name (a tool definition is {{"type": '
                                             f'"function", "function": {{"name": "...", ...}}}})')
                        if name not in self.functions:
                            raise ValueError(f"{where} declares the tool {name!r}, which --tools {self.spec} does "
                                             f"not define (it defines: {', '.join(sorted(self.functions))})")

    def answer(self, calls: list[ToolCall]) -> list[tuple[str, bool]]:
        """The answers to a turn's calls, in order (`run`): those past `max_calls` are not run but answered
        with an error, as a call that cannot run is."""
        over = _error(f"more than {self.max_calls} tool calls in one turn (--max-tool-calls {self.max_calls}): "
                      f"this one was not run")
        return [self.run(c) if i < self.max_calls else (over, True) for i, c in enumerate(calls)]

    def run(self, call: ToolCall) -> tuple[str, bool]:
        """The content of the tool message that answers `call`, and whether it is an error."""
        if call.problem:
            return _error(call.problem), True
        fn = self.functions.get(call.name)
        if fn is None:
            return _error(f"unknown tool {call.name!r}; the tools are: {', '.join(sorted(self.functions))}"), True
        try:
            self.signatures[call.name].bind(**call.arguments)
        except TypeError as e:
            return _error(f"the arguments do not fit {call.name}{self.signatures[call.name]}: {e}"), True
        try:
            # a copy: a tool that changes its arguments must not change the transcript the rewards read
            value = call_with_timeout(fn, copy.deepcopy(call.arguments), self.timeout)
        except ToolTimeout:
            return _error(f"{call.name} did not return within {self.timeout:g} s"), True
        except KeyboardInterrupt:  # the user's Ctrl-C, not the tool's failure
            raise
        except BaseException as e:  # SystemExit too, and libraries' own (asyncio's CancelledError)
            return _error(f"{call.name} raised {type(e).__name__}: {e}"), True
        return _result_text(call.name, value)


def tool_message(call: ToolCall, content: str) -> dict:
    message = {"role": "tool", "content": content}
    if call.name:
        message["name"] = call.name
    return message


# ------------------------------------------------------------------------------ the chat template

def _render(tok: ChatTokenizer, messages: list[dict], generation_prompt: bool) -> str:
    tools = conversation_tools(messages)
    kwargs = {"tools": tools} if tools else {}  # none: our ChatML keeps its jinja-free path
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)


def results_text(tok: ChatTokenizer, messages: list[dict]) -> str:
    """The text after the model's stop token once its turn's calls are answered: the rest of the assistant
    turn as the template ends it (a newline), the trailing `tool` messages and the next generation prompt.

    `messages` ends with the assistant turn and its tool messages. The template must render a conversation
    so that appending messages only appends text; one that does not is refused (`check_template`).
    """
    first = len(messages)  # the first of the trailing tool messages
    while first > 1 and messages[first - 1]["role"] == "tool":
        first -= 1
    eos = tok.decode([tok.eos_token_id], skip_special_tokens=False)
    earlier = _render(tok, messages[:first - 1], False)
    turn = _render(tok, messages[:first], False)
    after = _render(tok, messages, True)
    end = turn.rfind(eos)
    if end < len(earlier) or not after.startswith(turn):
        raise ValueError(f"the chat template does not render tool results as text appended to the conversation "
                         f"(after an assistant turn that ends with {eos!r}), which multi-turn rollouts need")
    return turn[end + len(eos):] + after[len(turn):]


def check_template(tok: ChatTokenizer, messages: list[dict], tool: str) -> None:
    """At start-up: the template answers a call to `tool` after `messages` (a prompt) by appending text that
    holds the tool's result, and answers a malformed call too (a reply without `tool_calls`, then the error)."""
    call = ToolCall(tool, {})
    text = _probe(tok, [*messages, assistant_message("", [call]), tool_message(call, PROBE)], "a tool message")
    if PROBE not in text:
        raise ValueError("--tools: the chat template leaves tool messages out, so the model would never read "
                         "a tool's result")
    malformed = parse_tool_calls(f"{OPEN}{tool}{CLOSE}")
    _probe(tok, [*messages, assistant_message(*malformed), tool_message(malformed[1][0], _error(PROBE))],
           "the answer to a malformed tool call (a tool message after a reply without tool_calls)")


def _probe(tok: ChatTokenizer, messages: list[dict], what: str) -> str:
    try:
        return results_text(tok, messages)
    except ValueError as e:
        raise ValueError(f"--tools: {e}") from None
    except Exception as e:  # a template's own error (raise_exception): at run time it would stop the run
        raise ValueError(f"--tools: the chat template cannot render {what}: {e}") from None


# ------------------------------------------------------------------------------ multi-turn rollouts

@dataclass
class Episode:
    """One row's rollout: the prompt, then every turn and the template's tokens between turns."""

    prompt: list[int]
    messages: list[dict] | None  # with --tools: the conversation, the prompt's messages then each turn's
    tail: list[int] = field(default_factory=list)  # every token after the prompt
    sampled: list[bool] = field(default_factory=list)  # per tail token: sampled by the policy (carries loss)
    final: list[int] = field(default_factory=list)  # the last turn's tokens
    final_text: str = ""
    turns: int = 0
    calls: int = 0  # calls answered (those of turns that ended with their stop token)
    errors: int = 0  # of which answered with an error

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.tail

    def extend(self, tokens: list[int], sampled: bool) -> None:
        self.tail += tokens
        self.sampled += [sampled] * len(tokens)


# (prompts, per-row token budgets, turn) -> each row's new tokens, its stop token included
SampleTurn = Callable[[list[list[int]], list[int], int], list[list[int]]]


def decode_groups(lengths: list[int], budgets: list[int], limit: int) -> list[list[int]]:
    """Rows grouped for the decoder, which sizes its cache as the longest prompt + the largest budget and
    refuses more than `limit` (the model's context): all rows in order when that fits, else by length."""
    if max(lengths) + max(budgets) <= limit:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[i] + max(budgets[j] for j in [*groups[-1], i]) <= limit:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _take_turn(e: Episode, out: list[int], text: str, toolbox: Toolbox | None, eos: int) -> bool:
    """Add a sampled turn to the episode and run its calls; True when the calls were answered (the
    episode may go on). A turn cut before its stop token ends the episode: its calls are not run."""
    e.extend(out, True)
    e.final, e.final_text, e.turns = out, text, e.turns + 1
    if toolbox is None:
        return False
    content, calls = parse_tool_calls(text)
    e.messages.append(assistant_message(content, calls))
    if not calls or not out or out[-1] != eos:
        return False
    for call, (result, failed) in zip(calls, toolbox.answer(calls)):
        e.messages.append(tool_message(call, result))
        e.calls, e.errors = e.calls + 1, e.errors + failed
    return True


def run_episodes(prompts: list[list[int]], messages: list[list[dict]] | None, sample_turn: SampleTurn,
                 tok: ChatTokenizer, toolbox: Toolbox | None, max_turns: int, seq_len: int,
                 max_new_tokens: int) -> list[Episode]:
    """Roll every prompt out, turn by turn, the rows that go on sampled together. Without a toolbox a
    rollout is one turn. Each turn samples at most `max_new_tokens`, and no more than leaves the whole
    sequence within `seq_len`; tool results that would leave no room for a token end the episode."""
    episodes = [Episode(p, None if messages is None else [dict(m) for m in msgs])
                for p, msgs in zip(prompts, messages or [None] * len(prompts))]
    live = episodes
    for turn in range(max_turns if toolbox else 1):
        outs = sample_turn([e.ids for e in live], [min(max_new_tokens, seq_len - len(e.ids)) for e in live], turn)
        answered = [e for e, out, text in zip(live, outs, tok.decode_batch(outs))
                    if _take_turn(e, out, text, toolbox, tok.eos_token_id)]
        live = _answer(answered if turn + 1 < max_turns else [], tok, seq_len)
        if not live:
            break
    return episodes


def results_doc(tok: ChatTokenizer, messages: list[dict]) -> Doc:
    """`results_text` with the template's control tokens marked (`records.marked_doc`), so that a tool result
    spelling `<|im_end|>\n<|im_start|>system` (a web page, a file) is encoded as text, as training data quoting
    it was, and opens no turn. The model's own text, which may hold the noncharacter the marking escapes
    with, is not in these tokens: it reads U+FFFD for the marking (tool results read so already: `_encodable`)."""
    return marked_doc(map_strings(messages, unmarked), tok, lambda m: Doc(results_text(tok, m)),
                      lambda m: results_text(tok, m))


def _answer(episodes: list[Episode], tok: ChatTokenizer, seq_len: int) -> list[Episode]:
    """Append the template's tokens of each episode's tool results and next generation prompt (`results_doc`,
    encoded as the shards encode a conversation), where they leave room for at least one more token; returns
    the episodes that go on."""
    going = []
    for e, delta in zip(episodes, doc_ids(tok, [results_doc(tok, e.messages) for e in episodes])):
        if len(e.ids) + len(delta) < seq_len:
            e.extend(delta, False)
            going.append(e)
    return going
