"""Chat over a model: loading, the chat template, history trimmed to the context, streamed text.

Shared by `launch/chat.py` and the server. `TextStream` turns tokens into text deltas as they arrive:
it holds back an incomplete UTF-8 character and any tail that may still grow into a stop string, so the
streamed text never shows half a character or part of a stop string.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from minimind_fast.checkpoint import is_hf_dir, resolve_model_dir, tokenizer_dir_beside
from minimind_fast.config import get_preset
from minimind_fast.data.pipeline import doc_ids, prompt_ids
from minimind_fast.data.records import Doc, RecordError, check_messages, conversation_field, refuse_record_tools
from minimind_fast.data.sources import iter_records
from minimind_fast.data.tokenizer import LONE_SURROGATE, ChatTokenizer, check_same_tokenizer, load_tokenizer, unmarked
from minimind_fast.files import check_input_files, write_file_whole
from minimind_fast.generation import GenerationConfig, generate, stream_generate
from minimind_fast.model import MiniMindForCausalLM


def find_tokenizer(model_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ChatTokenizer:
    """The tokenizer stored beside the weights (model, run or HF dir, or a .pth's folder), or the one given,
    which must be the same (`check_same_tokenizer`)."""
    p = Path(model_path)
    if not p.exists():
        raise FileNotFoundError(f"{model_path}: no such model directory or file")
    if p.suffix != ".pth" and not is_hf_dir(p):
        resolve_model_dir(p)  # no weights there at all: say that, not that their tokenizer is missing
    beside_dir = tokenizer_dir_beside(p)
    beside = load_tokenizer(beside_dir) if beside_dir else None
    if not tokenizer:
        if beside is None:
            raise FileNotFoundError(f"{model_path}: no tokenizer.json beside the weights; pass --tokenizer DIR")
        return beside
    given = load_tokenizer(tokenizer)
    check_same_tokenizer(given, beside, model_path)
    return given


def pick_device(device: str = "auto") -> torch.device:
    """`device` as a torch.device ("auto": CUDA when present); ValueError for one that cannot be used."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a device name ({e})") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: {torch.cuda.device_count()} CUDA device(s) available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available")
    return dev


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`dtype` (auto, fp32, bf16, fp16) as a torch.dtype; auto is bf16 on CUDA, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_chat_model(path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                    lora: str | os.PathLike | None = None) -> MiniMindForCausalLM:
    """Our model/run dir, a Hugging Face export or a MiniMind2 .pth, optionally with a LoRA adapter, for inference.

    A LoRA run's model directory keeps the base weights with the adapter in `adapter/`: loading the run
    means the fine-tuned model, so its adapter is applied (said so; `lora="none"` keeps the base). The
    adapter is merged: inference runs at the base model's speed."""
    from minimind_fast.lora import load_tuned_model

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model, adapter = load_tuned_model(path, lora)
    if lora is None and adapter is not None:
        print(f"applying the LoRA adapter in {adapter} (--lora none for the base model)", file=sys.stderr)
    return model.to(device=dev, dtype=torch_dtype).eval()


def load_preset_model(preset: str, device: str = "auto", dtype: str = "auto") -> MiniMindForCausalLM:
    """A randomly initialised model of `preset`, in eval mode (a smoke test of generation)."""
    dev = pick_device(device)
    return MiniMindForCausalLM(get_preset(preset)).to(device=dev, dtype=pick_dtype(dtype, dev)).eval()


def byte_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids without a tokenizer: the text's UTF-8 bytes, folded into the vocabulary."""
    return [b % vocab_size for b in text.encode()]


def check_utf8(text: str | None, what: str) -> None:
    """ValueError naming `what` if `text` holds lone surrogates: undecodable bytes from argv or stdin
    (surrogateescape) or a JSON \\udcXX escape, which the tokenizer rejects with a TypeError."""
    if text and LONE_SURROGATE.search(text):
        raise ValueError(f"{what} is not valid UTF-8")


def check_vocab(tokenizer: ChatTokenizer, model: MiniMindForCausalLM) -> None:
    """Refuse a tokenizer with ids the model has no embedding for: they would fail mid-generation."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer DIR)")


class TextStream:
    """Incremental detokenisation with stop strings: `push(token)` -> new text, `finish()` -> the rest."""

    def __init__(self, tokenizer: ChatTokenizer, stop_strings: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.tokens: list[int] = []
        self.shown = 0  # characters of the text already handed out
        self.stopped = False

    def text(self) -> str:
        """The whole text so far, cut before the first stop string."""
        text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.text()
        if self.stopped:
            return self._emit(text)
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            safe = len(text.rstrip("\ufffd"))
        # A tail that starts a stop string may still become one: hold it back.
        head = text[:safe]
        hold = max((k for s in self.stop_strings for k in range(1, len(s)) if head.endswith(s[:k])), default=0)
        return self._emit(text[:max(safe - hold, self.shown)])

    def finish(self) -> str:
        return self._emit(self.text())

    def _emit(self, text: str) -> str:
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


def chat_prompt(tokenizer: ChatTokenizer, messages: list[dict]) -> list[int]:
    """Ids of `messages` as the SFT shards hold the text before a reply (`pipeline.prompt_ids`: a message quoting
    `<|im_end|>` is text, not the end of its turn); RecordError (a ValueError) when the tokenizer's chat template
    refuses them (e.g. its raise_exception for an order it does not take) or a message holds U+FDD0."""
    return prompt_ids(tokenizer, messages)


def text_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Ids of raw text as pretraining and the messages' text were encoded: a control token's text is text."""
    return doc_ids(tokenizer, [Doc(text)])[0]


class ChatSession:
    """Multi-turn chat: keeps the history, renders it with the template, drops the oldest turns to fit."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer: ChatTokenizer, config: GenerationConfig,
                 system: str | None = None, cuda_graph: bool = False):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.system = system
        self.cuda_graph = cuda_graph
        self.history: list[dict] = []
        self.cut_tokens = 0  # tokens left out of the last message (longer than the context allows)
        if tokenizer.eos_token_id not in config.stop_token_ids:
            config.stop_token_ids = [*config.stop_token_ids, tokenizer.eos_token_id]

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of the template over (system,) history and `user_text`; whole old turns go first, then the
        oldest tokens of the message itself if it alone is too long (`self.cut_tokens` says how many)."""
        budget = self.model.config.max_position_embeddings - self.config.max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens {self.config.max_new_tokens} leaves no room in the context "
                             f"({self.model.config.max_position_embeddings})")
        turns = [*self.history, {"role": "user", "content": user_text}]
        system = [{"role": "system", "content": self.system}] if self.system else []
        self.cut_tokens = 0
        while True:
            ids = chat_prompt(self.tokenizer, system + turns)
            if len(ids) <= budget:
                self.history = turns[:-1]
                return ids
            if len(turns) == 1:
                self.history = []
                return self._cut_message(system, user_text, budget)
            turns = turns[2:]  # the oldest user/assistant pair

    def _cut_message(self, system: list[dict], user_text: str, budget: int) -> list[int]:
        """The prompt with only the last tokens of `user_text` that fit: cut inside the message, so the
        template's markers (system, user, assistant turn) stay whole."""
        frame = len(chat_prompt(self.tokenizer, [*system, {"role": "user", "content": ""}]))
        message = text_ids(self.tokenizer, user_text)  # as the prompt holds it: no control token
        keep = budget - frame
        while keep > 0:  # re-encoding the cut text may merge or split a token at the seams: step down
            # a cut inside a multi-byte character decodes to U+FFFD: leave that piece out
            cut = self.tokenizer.decode(message[len(message) - keep:]).lstrip("\ufffd")
            ids = chat_prompt(self.tokenizer, [*system, {"role": "user", "content": cut}])
            if len(ids) <= budget:
                self.cut_tokens = len(message) - keep
                return ids
            keep -= len(ids) - budget
        raise ValueError(f"the system prompt and the chat template take {frame} tokens, leaving no room for a "
                         f"message in the context ({self.model.config.max_position_embeddings}) less "
                         f"max_new_tokens {self.config.max_new_tokens}")

    def stream_reply(self, user_text: str) -> Iterator[str]:
        """Yield pieces of the reply as they are generated; the turn joins the history at the end."""
        stream = TextStream(self.tokenizer, self.config.stop_strings)
        stops = set(self.config.stop_token_ids)
        for tok in stream_generate(self.model, self.prompt_ids(user_text), self.config,
                                   pad_id=self.tokenizer.pad_token_id, tokenizer=self.tokenizer,
                                   cuda_graph=self.cuda_graph):
            if tok in stops:
                break
            piece = stream.push(tok)
            if piece:
                yield piece
        rest = stream.finish()
        if rest:
            yield rest
        # U+FDD0, which the model may write but a message may not hold (it marks quoted control-token text),
        # reads U+FFFD, as in tool results: kept, it would have every later message refused
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": unmarked(stream.text())}]


def encode_prompt(tokenizer: ChatTokenizer, record: dict, mode: str) -> list[int]:
    """Prompt ids of a JSONL record: raw text after bos, as pretraining framed a text (`pretrain`), or as GRPO
    encodes one, the ids SFT data puts before a reply (`chat`). Text that spells a control token is text in
    both, as in training. RecordError if the template cannot render the messages."""
    if mode == "pretrain":
        return [tokenizer.bos_token_id, *text_ids(tokenizer, record.get("prompt", ""))]
    return chat_prompt(tokenizer, record_messages(record))


def record_messages(record: dict) -> list[dict]:
    """The chat messages of a `{"prompt": ...}` or `{"conversations"/"messages": [...]}` record, checked as SFT data
    and GRPO prompts are (`records.check_messages`: tool definitions, `tool_calls`, content null)."""
    refuse_record_tools(record)
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    key = conversation_field(record)
    if key is None:
        raise RecordError("missing_field", "needs a 'prompt' string or a 'conversations' list of messages "
                                           "(or 'messages')")
    return check_messages(record[key], key)


def check_chat_flags(batch: str | None, output: str | None, system: str | None, mode: str) -> None:
    """Refuse (ValueError) `launch/chat.py` flags its mode would ignore without a word, and an --output that
    would replace its --batch input."""
    if output and not batch:
        raise ValueError("--output needs --batch (one --prompt's reply goes to stdout)")
    if system is not None and batch:
        raise ValueError("--system is not applied to --batch (give each line its own system message in "
                         "'conversations')")
    if system is not None and mode == "pretrain":
        raise ValueError("--system is not applied in --mode pretrain (raw text has no chat template)")
    if batch and output and Path(output).resolve() == Path(batch).resolve():
        raise ValueError(f"--output {output} is the --batch file: choose another --output")
    if output and os.path.isdir(output):  # before the answering, which could not be written there
        raise ValueError(f"--output {output}: a directory; give the path of the JSONL file to write")


def read_prompts(path: str | os.PathLike, mode: str = "chat") -> list[tuple[int, dict]]:
    """(line number, record) of each prompt of a JSONL or Parquet file (`sources`); a bad line raises
    ValueError naming the file, line and field, and so does a file without a prompt, naming the file."""
    if not os.path.exists(path) or os.path.isdir(path):  # not "truncated or corrupt" at record 0; a pipe is read
        check_input_files([path])
    records = []
    for lineno, raw in iter_records(Path(path)):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:  # what json raises past ~1000 levels of [ or {
            raise ValueError(f"{path}:{lineno}: malformed JSON (nested too deeply)") from None
        problem = _record_problem(rec, mode)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        records.append((lineno, rec))
    if not records:  # as tokenize.py and GRPO/PPO prompt files: an empty answer file would pass for a done job
        raise ValueError(f"{path}: holds no prompts (no line with a record)")
    return records


def _record_problem(rec, mode: str) -> str | None:
    """Why `encode_prompt` cannot take this record in `mode`, or None (the template is tried later)."""
    if not isinstance(rec, dict):
        return "a line must hold a JSON object"
    if mode == "pretrain":
        if not isinstance(rec.get("prompt"), str):
            return "needs a 'prompt' string (--mode pretrain continues raw text)"
        try:
            check_utf8(rec["prompt"], "'prompt'")
        except ValueError as e:
            return str(e)
        return None
    try:
        record_messages(rec)
    except RecordError as e:
        return str(e)
    return None


def encode_prompts_to_fit(tokenizer: ChatTokenizer, records: list[tuple[int, dict]], mode: str, context: int,
                          max_new_tokens: int, source: str | os.PathLike) -> list[list[int]]:
    """Prompt ids of each (line, record); ValueError naming the line of one that leaves no room for
    `max_new_tokens` (cutting it would drop the template's start or the question: the server refuses it too)."""
    budget = context - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in the context ({context})")
    prompts = []
    for lineno, rec in records:
        try:
            ids = encode_prompt(tokenizer, rec, mode)
        except RecordError as e:  # the template fails or drops the tools, or the text has a lone surrogate
            raise ValueError(f"{source}:{lineno}: {e}") from None
        if len(ids) > budget:
            raise ValueError(f"{source}:{lineno}: the prompt takes {len(ids)} tokens; with {max_new_tokens} new "
                             f"tokens the context ({context}) holds {budget} (shorten it or lower --max-new-tokens)")
        prompts.append(ids)
    return prompts


def answer_file(model: MiniMindForCausalLM, tokenizer: ChatTokenizer, config: GenerationConfig,
                in_path: str | os.PathLike, out_path: str | os.PathLike, batch_size: int = 16, mode: str = "chat",
                cuda_graph: bool = False) -> int:
    """Answer every prompt of a JSONL file in batches; each output line is the record plus `response`.

    The output appears only when complete (written to a temporary file, then renamed).
    """
    records = read_prompts(in_path, mode)
    config.stop_token_ids = sorted({*config.stop_token_ids, tokenizer.eos_token_id})
    all_prompts = encode_prompts_to_fit(tokenizer, records, mode, model.config.max_position_embeddings,
                                        config.max_new_tokens, in_path)
    def write(tmp: Path) -> None:  # a hidden name of this process's own: no user's OUT.tmp is overwritten
        try:
            out = open(tmp, "w", encoding="utf-8")
        except OSError as e:  # under a file, no permission: named as the output, not its hidden temporary
            raise OSError(f"{out_path}: cannot write the answers there ({e.strerror or e})") from None
        with out:
            for start in range(0, len(records), batch_size):
                chunk = [rec for _, rec in records[start:start + batch_size]]
                prompts = all_prompts[start:start + batch_size]
                # Prompt n of the file samples with seed + n whatever --batch-size groups it with.
                answers = generate(model, prompts, config.for_prompt(start), pad_id=tokenizer.pad_token_id,
                                   tokenizer=tokenizer, cuda_graph=cuda_graph)
                for rec, ids in zip(chunk, answers):
                    stream = TextStream(tokenizer, config.stop_strings)
                    stream.tokens = ids
                    out.write(json.dumps({**rec, "response": stream.text()}, ensure_ascii=False) + "\n")

    write_file_whole(Path(out_path), write)
    return len(records)


# --------------------------------------------------------------------------------------------------
# Terminal use (launch/chat.py): streamed to stdout
# --------------------------------------------------------------------------------------------------
def print_continuation(model: MiniMindForCausalLM, tokenizer: ChatTokenizer, config: GenerationConfig, prompt: str,
                       cuda_graph: bool = False) -> None:
    """`--mode pretrain`: print `prompt`, then its raw-text continuation as it is generated."""
    ids = encode_prompt(tokenizer, {"prompt": prompt}, "pretrain")
    print(prompt, end="", flush=True)
    stream = TextStream(tokenizer, config.stop_strings)
    for tok in stream_generate(model, ids, config, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                               cuda_graph=cuda_graph):
        if tok == tokenizer.eos_token_id:
            break
        print(stream.push(tok), end="", flush=True)
    print(stream.finish())


def print_reply(session: ChatSession, text: str, prefix: str = "") -> None:
    """Print the reply to `text` as it is generated, after `prefix`; a message the prompt refuses (RecordError)
    raises before anything is printed."""
    pieces = session.stream_reply(text)
    first = next(pieces, "")  # the prompt is built before the first piece
    if session.cut_tokens:
        print(f"(the message is longer than the context allows: its first {session.cut_tokens} tokens were left "
              "out)", file=sys.stderr, flush=True)
    print(prefix + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def interactive(session: ChatSession) -> None:
    """Read user turns from stdin until /exit or its end; /reset clears the history."""
    print("Chat (/reset clears the history, /exit quits)")
    typed = sys.stdin.isatty()  # a person can retype a line; a piped script's later lines may depend on it
    lineno = 0
    while True:
        lineno += 1
        try:
            text = input("you> ").strip()
            check_utf8(text, f"stdin line {lineno}")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except ValueError as e:  # check_utf8's, or a strict stdin's UnicodeDecodeError
            # A strict stdin decodes ahead of the line handed out, so its error cannot name the line.
            problem = "stdin is not valid UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
            if not typed:
                raise ValueError(problem) from None
            print(f"\n({problem}: type it again)", file=sys.stderr)
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        if text:
            try:
                print_reply(session, text, prefix="model> ")
            except RecordError as e:  # the template's refusal, or U+FDD0: the history is as it was
                if not typed:
                    raise
                print(f"({e}: type it again)", file=sys.stderr)
