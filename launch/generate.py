"""Continue a prompt with a model, or with a randomly initialised preset (a smoke test of generation).

    python launch/generate.py --preset tiny --prompt "Hello" --max-new-tokens 16
    python launch/generate.py --model RUN_DIR --prompt "The cat" --temperature 0

With --preset there are no trained weights and no tokenizer: the prompt's UTF-8 bytes are the token ids
and the continuation is printed as ids. With --model the tokenizer beside the weights is used.
"""

import argparse
import sys
import time

import torch

from minimind_fast.chat import (
    byte_ids,
    check_utf8,
    check_vocab,
    encode_prompt,
    find_tokenizer,
    load_chat_model,
    load_preset_model,
)
from minimind_fast.config import PRESETS
from minimind_fast.generation import generate
from minimind_fast.inference_args import add_model_arguments, add_sampling_arguments, generation_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="randomly initialised model of this preset")
    src.add_argument("--model", help="model dir, run dir, Hugging Face export or MiniMind .pth")
    add_model_arguments(p, model_required=False)
    p.add_argument("--prompt", default="Hello")
    add_sampling_arguments(p, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    try:
        check_utf8(a.prompt, "--prompt")
        config = generation_config(a, stop_token_ids=[])
        if a.preset:
            for flag, value in (("--lora", a.lora), ("--tokenizer", a.tokenizer)):
                if value:  # random weights have no adapter or tokenizer of their own to pair with
                    raise ValueError(f"{flag} needs --model (--preset has random weights and byte ids)")
            model = load_preset_model(a.preset, a.device, a.dtype)
            tokenizer, ids = None, byte_ids(a.prompt, model.config.vocab_size)
        else:
            tokenizer = find_tokenizer(a.model, a.tokenizer)
            model = load_chat_model(a.model, a.device, a.dtype, a.lora)
            check_vocab(tokenizer, model)
            config.stop_token_ids = [tokenizer.eos_token_id]
            ids = encode_prompt(tokenizer, {"prompt": a.prompt}, "pretrain")
        start = time.perf_counter()
        new = generate(model, [ids], config, cuda_graph=not a.no_cuda_graph)[0]
        seconds = time.perf_counter() - start
    except (OSError, ValueError) as e:  # OSError: also weights that cannot be read
        sys.exit(f"error: {e}")
    print(a.prompt + tokenizer.decode(new) if tokenizer else f"prompt ids {ids}\nnew ids {new}")
    weights = next(model.parameters())
    print(f"[{len(new)} tokens in {seconds:.2f}s, {len(new) / max(seconds, 1e-9):.1f} tokens/s; "
          f"{str(weights.dtype).removeprefix('torch.')} on {weights.device}]", file=sys.stderr)


if __name__ == "__main__":
    main()
