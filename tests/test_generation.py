"""Generation: cached decoding against recomputation, batching, sampling filters, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from minimind_fast import MiniMindForCausalLM, get_preset
from minimind_fast.generation import (
    Decoder,
    GenerationConfig,
    apply_repetition_penalty,
    filter_logits,
    generate,
    has_stop_string,
    sample_tokens,
    stream_generate,
)

GREEDY = dict(temperature=0, stop_token_ids=[])


def _model(preset: str, device="cpu", dtype=torch.float32) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(get_preset(preset, vocab_size=97, kernels="reference",
                                           max_position_embeddings=128))
    with torch.no_grad():  # larger weights give peaked, varied predictions instead of near-uniform ones
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain recomputation of the whole sequence at every step, and the log-prob of each pick."""
    ids, logprobs = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids], device=model.lm_head.weight.device)).logits[0, -1].double()
        ids.append(int(logits.argmax()))
        logprobs.append(float(logits.log_softmax(-1)[ids[-1]]))
    return ids[len(prompt):], logprobs


PROMPTS = [[5, 17, 33, 3], [9], [40, 41, 42, 43, 44, 45, 46]]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_batched_greedy_equals_recomputation(preset):
    model = _model(preset)
    config = GenerationConfig(max_new_tokens=10, **GREEDY)
    batched, logprobs = generate(model, PROMPTS, config, return_logprobs=True)
    for prompt, out, lps in zip(PROMPTS, batched, logprobs):
        expected, expected_lps = greedy_without_cache(model, prompt, 10)
        assert out == expected
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64),
                                   torch.tensor(expected_lps, dtype=torch.float64), rtol=0, atol=1e-4)
        assert generate(model, [prompt], config)[0] == out
    assert len(set(map(tuple, batched))) > 1  # the rows differ: the comparison has teeth


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_a_repeated_prompt_is_prefilled_once_and_decodes_as_alone(preset):
    """GRPO's groups and a request's `n` choices repeat a prompt: prefill runs the distinct prompts only,
    and every copy decodes (greedy, or sampled with its own seed, with a penalty) as a lone request does."""
    model = _model(preset)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    prefill_rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: prefill_rows.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        greedy = generate(model, prompts, GenerationConfig(max_new_tokens=8, **GREEDY))
    finally:
        hook.remove()
    assert prefill_rows[0] == (2, len(PROMPTS[2]))  # two distinct prompts, left-padded to the longest
    assert greedy == [greedy_without_cache(model, p, 8)[0] for p in prompts]
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.5, seed=5, stop_token_ids=[],
                               repetition_penalty=1.3)
    together = generate(model, prompts, sampled)
    for i, p in enumerate(prompts):
        alone = GenerationConfig(max_new_tokens=10, temperature=1.5, seed=5 + i, stop_token_ids=[],
                                 repetition_penalty=1.3)
        assert together[i] == generate(model, [p], alone)[0]
    assert together[0] != together[2]  # the copies sample apart: each row keeps its own generator


def _join_and_leave(device: str, cuda_graph: bool) -> None:
    model = _model("tiny", device=device)
    alone = {i: greedy_without_cache(model, p, 8)[0] for i, p in enumerate(PROMPTS)}
    decoder = Decoder(model, max_batch=3, max_len=32, cuda_graph=cuda_graph)
    short = GenerationConfig(max_new_tokens=3, **GREEDY)
    decoder.add_batch([0, 1], PROMPTS[:2], [GenerationConfig(max_new_tokens=8, **GREEDY), short])
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(12):
        if step == 2:
            decoder.add(2, PROMPTS[2], GenerationConfig(max_new_tokens=8, **GREEDY))
        for ev in decoder.step():
            got[ev.key].append(ev.token)
            assert (ev.finish == "length") == (len(got[ev.key]) == (3 if ev.key == 1 else 8))
    assert got[0] == alone[0] and got[2] == alone[2] and got[1] == alone[1][:3]
    assert decoder.live == [] and decoder.free_rows == 3


def test_sequences_join_and_leave_between_steps():
    """Continuous batching: a row that joins mid-way, and rows that leave, decode as they would alone."""
    _join_and_leave("cpu", cuda_graph=False)


@pytest.mark.gpu
def test_sequences_join_and_leave_with_cuda_graphs():
    _join_and_leave("cuda", cuda_graph=True)


def test_abandoned_stream_leaves_nothing_behind():
    model = _model("tiny")
    config = GenerationConfig(max_new_tokens=8, **GREEDY)
    stream = stream_generate(model, PROMPTS, config)
    next(stream), next(stream)
    stream.close()
    assert generate(model, PROMPTS, config) == [greedy_without_cache(model, p, 8)[0] for p in PROMPTS]


def test_cancel_frees_the_row_and_keeps_the_others_exact():
    model = _model("tiny")
    decoder = Decoder(model, max_batch=2, max_len=32)
    decoder.add_batch(["a", "b"], PROMPTS[:2], [GenerationConfig(max_new_tokens=6, **GREEDY)] * 2)
    got = []
    for step in range(6):
        if step == 1:
            decoder.cancel("a")
        got += [ev.token for ev in decoder.step() if ev.key == "b"]
    assert got == greedy_without_cache(model, PROMPTS[1], 6)[0]


def test_cancel_outside_inference_mode_keeps_a_penalised_row_exact():
    """The server cancels between steps, outside inference mode; the penalty's `seen` rows are moved then too
    (it failed the step, and with it every request in the batch)."""
    model = _model("tiny")
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.3, **GREEDY)
    decoder = Decoder(model, max_batch=2, max_len=32)
    decoder.add_batch(["a", "b"], PROMPTS[:2], [config] * 2)
    got = []
    for step in range(6):
        if step == 1:
            decoder.cancel("a")  # row 0: the last row, b, moves into it
        got += [ev.token for ev in decoder.step() if ev.key == "b"]
    assert got == generate(model, [PROMPTS[1]], config)[0]
    assert got != generate(model, [PROMPTS[1]], GenerationConfig(max_new_tokens=6, **GREEDY))[0]  # penalised


def test_stop_token_ends_only_that_row_and_can_be_kept():
    model = _model("tiny")
    prompts = [[5, 17, 33], [9, 8]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=10, **GREEDY))
    stop = free[0][3]
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    out = generate(model, prompts, config)
    assert out[0] == free[0][:free[0].index(stop)]
    assert out[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    kept = generate(model, prompts, config, keep_stop_token=True)
    assert kept[0] == free[0][:free[0].index(stop) + 1]


class LetterTokenizer:
    """Token i decodes to one letter; enough to test stop strings without a trained tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_string_ends_the_row_on_the_token_that_completes_it():
    model = _model("tiny")
    free = generate(model, [[5, 17, 33]], GenerationConfig(max_new_tokens=12, **GREEDY))[0]
    text = LetterTokenizer().decode(free)
    stop = text[4:6]
    end = text.index(stop) + 2  # tokens up to and including the one that completes the stop string
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[], stop_strings=[stop])
    assert generate(model, [[5, 17, 33]], config, tokenizer=LetterTokenizer())[0] == free[:end]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[5, 17, 33]], config)
    # An empty stop string matches nothing (as the streamed text treats it), not every reply at once.
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[], stop_strings=[""])
    assert generate(model, [[5, 17, 33]], config, tokenizer=LetterTokenizer())[0] == free


class SilentSpecialTokenizer(LetterTokenizer):
    """As LetterTokenizer, but ids >= 100 are special tokens that decode to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode([i for i in ids if i < 100])


def test_stop_string_is_found_across_special_tokens():
    """The check decoded a fixed tail of 4 tokens a character: special tokens inside the stop string's
    span (decoding to nothing) pushed its start out of the tail and the row ran on to max_new_tokens."""
    tok = SilentSpecialTokenizer()
    cat, is_ = [2, 0, 19], [8, 18]  # "cat", "is"
    for specials in (0, 3, 40):
        tokens = [7, 7, *cat, *[100] * specials, *is_]
        assert tok.decode(tokens).endswith("catis")
        assert has_stop_string(tok, tokens, ["catis"]), specials
        assert not has_stop_string(tok, tokens, ["cats"]), specials
    assert not has_stop_string(tok, [100] * 50, ["a"])


def test_streaming_yields_the_tokens_of_generate():
    model = _model("tiny")
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3, stop_token_ids=[])
    streamed = list(stream_generate(model, [1, 2, 3], config))
    assert all(isinstance(t, int) for t in streamed) and len(streamed) == 8
    assert streamed == generate(model, [[1, 2, 3]], config)[0]
    batched = list(stream_generate(model, [[1, 2, 3], [4]], config))
    assert [step[0] for step in batched] == streamed


def test_seed_reproduces_and_does_not_depend_on_the_batch():
    model = _model("tiny")
    config = GenerationConfig(max_new_tokens=12, temperature=2.0, seed=11, stop_token_ids=[])
    first = generate(model, [[1, 2, 3]], config)[0]
    assert generate(model, [[1, 2, 3]], config)[0] == first
    assert generate(model, [[1, 2, 3], [7, 7]], config)[0] == first  # row 0 keeps seed 11 in a batch
    other = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=12, temperature=2.0, seed=12,
                                                          stop_token_ids=[]))[0]
    assert other != first
    assert generate(model, [[7, 7], [1, 2, 3]], config)[1] == other  # row i samples with seed + i
    top = GenerationConfig(max_new_tokens=12, temperature=2.0, seed=2**64 - 1, stop_token_ids=[])
    wrapped = GenerationConfig(max_new_tokens=12, temperature=2.0, seed=0, stop_token_ids=[])
    assert generate(model, [[7], [1, 2, 3]], top)[1] == generate(model, [[1, 2, 3]], wrapped)[0]  # past 2**64 - 1


def test_top_k_and_top_p_filters_against_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]  # 0.563, 0.207, 0.126, 0.076, 0.028
    assert probs[0] < 0.7 < probs[0] + probs[1] and probs[0] + probs[1] < 0.85 < probs[:3].sum()
    finite = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert finite(filter_logits(logits, 2, 1.0)) == [[True, True, False, False, False]]
    assert finite(filter_logits(logits, 0, 0.7)) == [[True, True, False, False, False]]
    assert finite(filter_logits(logits, 0, 0.5)) == [[True, False, False, False, False]]
    assert finite(filter_logits(logits, 0, 0.85)) == [[True, True, True, False, False]]
    assert finite(filter_logits(logits, 2, 0.85)) == [[True, True, False, False, False]]
    # Per-row settings, unsorted logits: kept logits keep their values.
    rows = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.9]])
    out = filter_logits(rows, torch.tensor([3, 0]), torch.tensor([1.0, 0.5]))
    assert finite(out) == [[True, True, True, False], [True, False, False, True]]
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([0.0, 2.0, 1.0, 3.0, 2.9]))


def test_sampling_inverts_the_filtered_cdf_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]] * 4)
    temperature = torch.tensor([0.5, 0.5, 0.5, 0.0])
    ones = torch.ones(4)
    scaled = logits[0] / 0.5
    cdf = scaled.softmax(-1).cumsum(-1)  # 0.844, 0.958, 0.987, 1.0
    u = torch.tensor([0.5, float(cdf[0]) + 1e-3, float(cdf[2]) + 1e-3, 0.99])
    tokens, logprobs = sample_tokens(logits, temperature, torch.zeros(4, dtype=torch.long), ones, ones, None, u)
    assert tokens.tolist() == [0, 1, 3, 0]  # the greedy row ignores u
    expected = torch.stack([scaled.log_softmax(-1)[t] for t in (0, 1, 3)] + [logits[0].log_softmax(-1)[0]])
    torch.testing.assert_close(logprobs, expected)
    # top_k=2 renormalises over two tokens: u just above p(token 0) now lands on token 1, never beyond.
    p0 = float(scaled[:2].softmax(-1)[0])
    tokens, _ = sample_tokens(logits[:2], temperature[:2], torch.tensor([2, 2]), ones[:2], ones[:2], None,
                              torch.tensor([p0 - 1e-3, 0.999]))
    assert tokens.tolist() == [0, 1]
    # A temperature so small that logits / T overflows still picks the top token with log-prob 0.
    tiny = torch.full((4,), 1e-38)
    tokens, logprobs = sample_tokens(logits.flip(-1) * torch.tensor([[10.0], [-10.0], [10.0], [-10.0]]), tiny,
                                     torch.zeros(4, dtype=torch.long), ones, ones, None, u)
    assert tokens.tolist() == [3, 0, 3, 0] and logprobs.tolist() == [0.0] * 4


def test_repetition_penalty_matches_the_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[True, True, False]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_repetition_penalty_in_generation_counts_prompt_and_new_tokens():
    model = _model("tiny")
    prompt = [5, 17, 33]
    config = GenerationConfig(max_new_tokens=6, temperature=0, stop_token_ids=[], repetition_penalty=1e4)
    out = generate(model, [prompt], config)[0]
    # A huge penalty forbids any token already present whenever an unseen one has a positive logit.
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


@torch.no_grad()
def penalised_greedy_in_float64(model, prompt: list[int], n: int, penalty: float) -> list[int]:
    """CTRL's penalty over prompt and new tokens, recomputed in float64 without a cache; the argmax."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[ids] = True
        ids.append(int(apply_repetition_penalty(logits[None], seen[None], penalty)[0].argmax()))
    return ids[len(prompt):]


def test_extreme_repetition_penalties_sample_as_float64_or_are_refused():
    """Penalties whose float32 arithmetic overflows (NaN probabilities: token 0 every step) are refused; the
    accepted extremes decode greedily as float64 does, and the smallest makes sampling one-hot on a seen token
    (a positive logit divided by 1e-30 outweighs everything else), so it must pick the same."""
    model = _model("tiny")
    prompt = [5, 17, 33]
    for penalty in (1e-300, 1e-31, 1e31, 1e300):
        with pytest.raises(ValueError, match="repetition_penalty must be in"):
            GenerationConfig(repetition_penalty=penalty)
    low, high = GenerationConfig.PENALTY_RANGE
    for penalty, temperature in ((low, 0.0), (high, 0.0), (low, 1.0)):
        config = GenerationConfig(max_new_tokens=6, temperature=temperature, seed=1, stop_token_ids=[],
                                  repetition_penalty=penalty)
        assert generate(model, [prompt], config)[0] == penalised_greedy_in_float64(model, prompt, 6, penalty)


def test_bad_requests_are_refused_with_a_reason():
    model = _model("tiny")
    with pytest.raises(ValueError, match="context length"):
        generate(model, [[1] * 100], GenerationConfig(max_new_tokens=50))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], GenerationConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            GenerationConfig(temperature=bad)
        with pytest.raises(ValueError, match=r"repetition_penalty must be in \[1e-30, 1e\+30\]"):
            GenerationConfig(repetition_penalty=bad)
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        GenerationConfig(seed=2**64)
    assert GenerationConfig(seed=2**64 - 1).seed == 2**64 - 1 and GenerationConfig(seed=-2**63).seed == -2**63
    with pytest.raises(ValueError, match="top_logprobs must be >= 0"):
        GenerationConfig(top_logprobs=-1)


def test_model_logprobs_are_the_raw_distribution_for_rows_that_ask():
    """`top_logprobs` reports the log-softmax of the model's raw logits, whatever temperature, penalty and top-k
    sample from, for the rows that ask only; checked against a float64 forward over prompt + tokens."""
    model = _model("tiny")
    asks = GenerationConfig(max_new_tokens=6, temperature=0.7, top_k=5, repetition_penalty=1.5, seed=3,
                            stop_token_ids=[], top_logprobs=4)
    every = GenerationConfig(max_new_tokens=2, temperature=0, stop_token_ids=[], top_logprobs=500)
    decoder = Decoder(model, max_batch=3, max_len=32)
    decoder.add_batch([0, 1, 2], [PROMPTS[0], PROMPTS[2], PROMPTS[1]],
                      [asks, GenerationConfig(max_new_tokens=6, temperature=0.7, seed=4, stop_token_ids=[]), every])
    got: dict[int, list] = {0: [], 1: [], 2: []}
    while decoder.live:
        for ev in decoder.step():
            got[ev.key].append(ev)
    assert all(ev.model_logprobs is None for ev in got[1])
    assert all(len(ev.model_logprobs.top) == 97 for ev in got[2])  # k past the vocabulary: all of it
    reference = model.double()  # last use of this model
    with torch.no_grad():
        rows = reference(torch.tensor([PROMPTS[0] + [ev.token for ev in got[0]]])).logits[0].log_softmax(-1)
    for t, ev in enumerate(got[0]):
        expected = rows[len(PROMPTS[0]) - 1 + t]
        values, ids = expected.topk(4)
        assert [tok for tok, _ in ev.model_logprobs.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in ev.model_logprobs.top], dtype=torch.float64),
                                   values, rtol=0, atol=1e-4)
        assert abs(ev.model_logprobs.logprob - float(expected[ev.token])) < 1e-4
    # The sampling log-prob is at temperature 0.7: the two differ, so the test tells them apart.
    assert all(abs(ev.logprob - ev.model_logprobs.logprob) > 1e-3 for ev in got[0])


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cuda_graph_decoding_matches_eager(preset):
    model = _model(preset, device="cuda")
    config = GenerationConfig(max_new_tokens=10, **GREEDY)
    eager = generate(model, PROMPTS, config, cuda_graph=False)
    assert generate(model, PROMPTS, config, cuda_graph=True) == eager
    for prompt, out in zip(PROMPTS, eager):
        assert out == greedy_without_cache(model, prompt, 10)[0]
    # A later call reuses the captured graphs with other prompts and lengths.
    later = [[7, 8], [60, 61, 62, 63, 64]]
    config = GenerationConfig(max_new_tokens=20, **GREEDY)
    assert generate(model, later, config) == [greedy_without_cache(model, p, 20)[0] for p in later]


def test_a_batch_whose_padding_leaves_no_room_is_refused():
    """A short prompt prefilled beside a long one starts after the padding; it must not be cut short."""
    model = _model("tiny")
    decoder = Decoder(model, max_batch=2, max_len=32, cuda_graph=False)
    configs = [GenerationConfig(max_new_tokens=4, **GREEDY), GenerationConfig(max_new_tokens=20, **GREEDY)]
    with pytest.raises(ValueError, match=r"prompt 1: 2 tokens \(left-padded to 20\)"):
        decoder.add_batch([0, 1], [list(range(3, 23)), [5, 6]], configs)
    assert decoder.live == [] and decoder.free_rows == 2
