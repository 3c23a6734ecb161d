"""Serve a model over an OpenAI-compatible API (chat completions, streaming and not; model list).

    python launch/serve.py --model RUN_DIR_OR_HF_DIR_OR_PTH [--host 127.0.0.1] [--port 8000]

Then, e.g.: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x").chat.completions.create(
model=NAME, messages=[{"role": "user", "content": "Hi"}], stream=True); `n=` and `logprobs=True,
top_logprobs=k` work as OpenAI defines them. Concurrent requests (and the n choices of one) are decoded
together (continuous batching over --max-batch rows); at most --max-queue wait, further ones get 503.
"""

import argparse
import sys
from pathlib import Path

from minimind_fast.chat import check_vocab, find_tokenizer, load_chat_model
from minimind_fast.inference_args import add_model_arguments
from minimind_fast.serving.app import listen_socket, serve
from minimind_fast.serving.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--name", help="model id clients must send (default: the model path's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=4096, help="context per sequence (capped by the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--default-max-tokens", type=int, default=512, help="when a request gives no max_tokens")
    a = p.parse_args()
    if a.default_max_tokens < 1:
        sys.exit(f"error: --default-max-tokens must be >= 1, got {a.default_max_tokens}")
    try:
        sock = listen_socket(a.host, a.port)  # before loading: a port in use is an error at once
        tokenizer = find_tokenizer(a.model, a.tokenizer)
        model = load_chat_model(a.model, a.device, a.dtype, a.lora)
        check_vocab(tokenizer, model)
        engine = Engine(model, tokenizer, max_batch=a.max_batch, max_len=a.max_len, max_queue=a.max_queue,
                        cuda_graph=not a.no_cuda_graph).start()
    except (OSError, ValueError) as e:  # OSError: also a weight file that cannot be read
        sys.exit(f"error: {e}")
    name = a.name or Path(a.model).resolve().name
    host, port = sock.getsockname()[:2]
    print(f"serving {name!r} on http://{host}:{port}/v1 (max batch {a.max_batch}, context {engine.max_len})",
          flush=True)
    serve(engine, name, sock, a.default_max_tokens)


if __name__ == "__main__":
    main()
