"""Tokenizer: training, MiniMind's special ids, the chat template against transformers, loading as is."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from piece_texts import PIECE_TEXTS

import minimind_fast.data.tokenizer as tokenizer_module
from minimind_fast.data.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_tokenizer, whitespace_pieces

CONVERSATIONS = [
    [{"role": "user", "content": "What colour is the cat?"}, {"role": "assistant", "content": "The cat is grey."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am MiniMind, 你好."}],
]

# A template in the style of MiniMind's own: a default system prompt when none is given.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}" + CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def tok(builtin_data):
    return load_tokenizer(builtin_data["tokenizer"])


@pytest.fixture(scope="module")
def hf_tok(builtin_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(builtin_data["tokenizer"]))


def test_special_tokens_at_minimind_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.tokenizer.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.vocab_size <= 1024
    # Special tokens are single tokens inside text, never split into bytes.
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2


def test_encode_decode_round_trip(tok, builtin_data):
    lines = builtin_data["files"]["pretrain"].read_text().splitlines()[:20]
    texts = [json.loads(line)["text"] for line in lines] + ["unseen wörds 你好 🙂 and\ttabs\n\nnewlines"]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text  # byte-level BPE is lossless, even off its training data
    assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    # the plain-Python ChatML path renders as the template itself does
    assert ours == tok._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert ours == expected + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_transformers_encodes_like_us(tok, hf_tok):
    text = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)


def test_token_bytes_are_the_exact_bytes_of_each_token(tok):
    """Byte-level pieces hold parts of UTF-8 characters: their bytes join into the text's, and each decodes
    (with U+FFFD for a cut character) to the tokenizer's own decoding of the token."""
    text = "I am MiniMind, 你好. café 🐱\x01"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert any("\ufffd" in tok.token_bytes(i).decode("utf-8", errors="replace") for i in ids)  # a cut character
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i).decode("utf-8", errors="replace") == tok.decode([i], skip_special_tokens=False), i
    assert tok.token_bytes(tok.eos_token_id) == b"<|im_end|>" and tok.token_bytes(tok.vocab_size + 5) == b""


def test_fingerprint_and_save(tok, tmp_path):
    tok.save(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert copy.fingerprint == tok.fingerprint
    assert copy.encode("The cat is grey.") == tok.encode("The cat is grey.")
    assert (tmp_path / "copy" / "tokenizer_config.json").exists()


def test_training_is_deterministic_and_streams_all_formats(builtin_data, tmp_path):
    files = [builtin_data["files"]["sft"], builtin_data["files"]["dpo"]]
    a = load_tokenizer(train_tokenizer(files, 400, tmp_path / "a"))
    b = load_tokenizer(train_tokenizer(files, 400, tmp_path / "b"))
    assert a.fingerprint == b.fingerprint
    assert 259 < a.vocab_size <= 400
    # Words only in conversations were learnt as merges, i.e. conversation content was read.
    assert len(a.encode(" capital")) == 1


def test_training_reads_utf8_lines_and_skips_others(tmp_path):
    from minimind_fast.data.tokenizer import iter_texts

    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\r\n"
                    + json.dumps({"text": "第二"}, ensure_ascii=False).encode("gbk") + b"\n"
                    + json.dumps({"text": "第三"}, ensure_ascii=False).encode())
    assert list(iter_texts([src])) == ["first", "第三"]
    src.write_text(json.dumps({"text": "half \ud800"}) + "\n" + json.dumps({"text": "\U0001F600"}) + "\n")
    assert list(iter_texts([src])) == ["\U0001F600"]
    # Fields of the wrong type are skipped; DPO's string form is read.
    src.write_text(json.dumps({"conversations": 5, "text": 3}) + "\n"
                   + json.dumps({"prompt": "Q", "chosen": "good", "rejected": "bad"}) + "\n")
    assert list(iter_texts([src])) == ["Q", "good", "bad"]


def test_training_bad_arguments(builtin_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train_tokenizer([tmp_path / "nope.jsonl"], 512, tmp_path / "t")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([builtin_data["files"]["sft"]], 100, tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("content", [b"", b"\n\r\n", b'not json\n[1, 2]\n{"text": 5, "conversations": "x"}\n'])
def test_training_without_any_text_is_refused(tmp_path, content):
    """A tokenizer of bytes alone (no merge learnt) is what an empty or all-invalid file would give."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(ValueError, match=f"no text to train on in {src}") as e:
        train_tokenizer([src], 300, tmp_path / "t")
    if content.startswith(b"not json"):
        assert f"{src}:1: not JSON" in str(e.value) and "'not a JSON object': 1" in str(e.value)
    assert not (tmp_path / "t").exists()


def test_training_reports_skipped_lines_and_a_short_vocabulary(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello hello world"}\n{broken\n')
    assert load_tokenizer(train_tokenizer([src], 5000, tmp_path / "t")).vocab_size < 5000
    err = capsys.readouterr().err
    assert f"{src}:2: not JSON" in err and "fewer than --vocab-size 5000" in err


def test_training_never_replaces_a_folder_holding_other_files(builtin_data, tmp_path, monkeypatch):
    files = [builtin_data["files"]["sft"]]
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        train_tokenizer(files, 300, data)
    assert [p.name for p in data.iterdir()] == ["notes.txt"]
    # A tokenizer directory is replaced (retraining), and `.` when empty is a valid output.
    first = load_tokenizer(train_tokenizer(files, 300, tmp_path / "tok")).fingerprint
    assert load_tokenizer(train_tokenizer(files, 320, tmp_path / "tok")).fingerprint != first
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    train_tokenizer(files, 300, ".")
    assert load_tokenizer(tmp_path / "here").vocab_size <= 300


def test_a_failed_save_leaves_the_old_tokenizer_and_no_temporary(builtin_data, tmp_path, monkeypatch):
    """A failure after the new files are written (a full disk at the last one): the old tokenizer stays,
    and its temporary sibling goes (a tokenizer's worth of hidden files beside it otherwise)."""
    files = [builtin_data["files"]["sft"]]
    first = load_tokenizer(train_tokenizer(files, 300, tmp_path / "tok")).fingerprint

    def full_disk(tmp, out):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer_module, "swap_into_place", full_disk)
    with pytest.raises(OSError, match="No space"):
        train_tokenizer(files, 320, tmp_path / "tok")
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert load_tokenizer(tmp_path / "tok").fingerprint == first


def test_foreign_tokenizer_dir_is_used_as_is(builtin_data, tmp_path, hf_tok):
    """A MiniMind-style directory (its own template and config) loads unchanged; its template is used."""
    d = tmp_path / "minimind_tok"
    d.mkdir()
    shutil.copy(builtin_data["tokenizer"] / "tokenizer.json", d / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "chat_template": DEFAULT_SYSTEM_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(d)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d))
    msgs = CONVERSATIONS[0]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
    assert rendered == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_the_template_is_found_where_transformers_finds_it(builtin_data, tmp_path):
    """transformers' save_pretrained writes the template to chat_template.jinja (not tokenizer_config.json),
    which wins over a config's chat_template; a config may also list named templates, 'default' used."""
    from transformers import AutoTokenizer

    d = tmp_path / "saved"
    hf = AutoTokenizer.from_pretrained(str(builtin_data["tokenizer"]))
    hf.chat_template = DEFAULT_SYSTEM_TEMPLATE
    hf.save_pretrained(str(d))
    assert (d / "chat_template.jinja").is_file()
    config = json.loads((d / "tokenizer_config.json").read_text())
    cases = [dict(config, chat_template="{{ 'shadowed by chat_template.jinja' }}"),
             dict(config, chat_template=[{"name": "tool_use", "template": "{{ 'not the default' }}"},
                                         {"name": "default", "template": DEFAULT_SYSTEM_TEMPLATE}])]
    msgs = CONVERSATIONS[0]
    for i, case in enumerate(cases):
        (d / "tokenizer_config.json").write_text(json.dumps(case))
        if i == 1:
            (d / "chat_template.jinja").unlink()
        rendered = load_tokenizer(d).apply_chat_template(msgs, add_generation_prompt=True)
        assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"), i
        load_tokenizer(d).save(tmp_path / f"copy{i}")  # what a checkpoint carries renders alike
        assert load_tokenizer(tmp_path / f"copy{i}").apply_chat_template(msgs, add_generation_prompt=True) == rendered
        assert rendered == AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True), i
    (d / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=[{"name": "tool_use",
                                                                                    "template": "x"}])))
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer_config.json'}: .*none named 'default'"):
        load_tokenizer(d)


def test_tools_render_as_transformers_renders_them(builtin_data, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(builtin_data["tokenizer"] / "tokenizer.json", d / "tokenizer.json")
    template = "{% for t in tools %}{{ t | tojson }}\n{% endfor %}" + CHATML_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    from transformers import AutoTokenizer

    tools = [{"type": "function", "function": {"name": "天气", "description": "a <city>'s weather & more"}}]
    rendered = load_tokenizer(d).apply_chat_template(CONVERSATIONS[0], tools=tools)
    assert rendered.startswith(json.dumps(tools[0], ensure_ascii=False) + "\n<|im_start|>user")
    assert rendered == AutoTokenizer.from_pretrained(str(d)).apply_chat_template(CONVERSATIONS[0], tools=tools,
                                                                                  tokenize=False)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_damaged_tokenizer_files_are_named(builtin_data, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(builtin_data["tokenizer"], d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer_config.json'}: unreadable"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer.json'}: not a readable tokenizer"):
        load_tokenizer(d)


@pytest.fixture(scope="module")
def piece_toks(builtin_data, tmp_path_factory):
    """Ours, and one trained on PIECE_TEXTS: merges of space runs, CJK and the rest, which a cut in the
    wrong place would split."""
    src = tmp_path_factory.mktemp("pieces") / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in PIECE_TEXTS.values()) * 3)
    trained = train_tokenizer([src], 700, src.parent / "tok")
    return [load_tokenizer(builtin_data["tokenizer"]), load_tokenizer(trained)]


def _pieces_encoding(tok, pieces):
    ids, offsets = [], []
    for start, piece in pieces:
        e = tok.tokenizer.encode(piece, add_special_tokens=False)
        ids += e.ids
        offsets += [(a + start, b + start) for a, b in e.offsets]
    return ids, offsets


@pytest.mark.parametrize("name", PIECE_TEXTS)
@pytest.mark.parametrize("min_chars", [1, 7, 64])
def test_whitespace_pieces_encode_as_the_whole_text(piece_toks, name, min_chars):
    text = PIECE_TEXTS[name]
    pieces = list(whitespace_pieces(text, min_chars))
    assert "".join(p for _, p in pieces) == text
    assert [s for s, _ in pieces] == [sum(len(p) for _, p in pieces[:i]) for i in range(len(pieces))]
    assert all(len(p) >= min_chars for _, p in pieces[:-1])
    assert len(pieces) == 1 if name == "no_whitespace" else len(pieces) > 3
    for tok in piece_toks:
        assert tok.encodes_whitespace_pieces_exactly
        whole = tok.tokenizer.encode(text, add_special_tokens=False)
        assert _pieces_encoding(tok, pieces) == (whole.ids, whole.offsets)


def test_a_cut_elsewhere_changes_the_ids(piece_toks):
    """Why the cuts go only where they do: inside a run of spaces, or before a character Python counts as
    whitespace but the tokenizer's regex does not, a cut gives other pre-tokens, hence other ids."""
    tok = piece_toks[1]
    text = "a" + " " * 8 + "b"
    whole = tok.encode(text)
    assert [s for s, _ in whitespace_pieces(text, 1)] == [0, 1]
    assert tok.encode("a ") + tok.encode(" " * 7 + "b") != whole
    pre = tok.tokenizer.pre_tokenizer.pre_tokenize_str
    assert len(pre("!\x1c")) == 1 and [s for s, _ in whitespace_pieces("!\x1c!\x1c", 1)] == [0]


@pytest.mark.parametrize("change", ["normalizer", "added token with a space", "rstrip", "lstrip",
                                    "prefix space", "other pre-tokenizer"])
def test_tokenizers_that_pieces_would_change_are_encoded_whole(builtin_data, tmp_path, change):
    spec = json.loads((builtin_data["tokenizer"] / "tokenizer.json").read_text())
    if change == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif change == "prefix space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif change == "other pre-tokenizer":
        spec["pre_tokenizer"] = {"type": "Whitespace"}
    else:
        content = "x y" if change == "added token with a space" else "<r>"
        spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": content, "single_word": False,
                                     "lstrip": change == "lstrip", "rstrip": change == "rstrip",
                                     "normalized": False, "special": True})
    d = tmp_path / "tok"
    shutil.copytree(builtin_data["tokenizer"], d)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(d)
    assert not tok.encodes_whitespace_pieces_exactly
    if change in ("added token with a space", "rstrip"):  # where pieces do give other ids
        text = "a x y <r> b"
        assert _pieces_encoding(tok, whitespace_pieces(text, 1))[0] != tok.encode(text)


# ---------------------------------------------------------------------------------------------------
# A SentencePiece-style tokenizer as Hugging Face ships Llama's (brought in by `convert.py from-hf`):
# a "▁"-for-space normalizer, byte-fallback pieces <0xNN>, `<s>`/`</s>`, no pad token
# ---------------------------------------------------------------------------------------------------
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                  "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
                  "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    texts = ["the cat sat on the mat", "what colour is the cat? the cat is grey."] * 50
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    # Llama's layout: the specials, then one piece per byte (what byte fallback writes), then the merges' pieces
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True)
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    d = tmp_path_factory.mktemp("sentencepiece")
    (d / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": None, "add_bos_token": True, "add_eos_token": False}))
    return d


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos(sentencepiece_dir):
    """Llama's tokenizers name no pad token (and have no <|endoftext|>): padding, always masked, uses eos."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(sentencepiece_dir)
    hf = AutoTokenizer.from_pretrained(str(sentencepiece_dir))
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert hf.pad_token_id is None and tok.pad_token_id == tok.eos_token_id


def _llama_conversation():
    return [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "is grey"},
            {"role": "user", "content": "what colour?"}]


def test_a_template_in_chat_template_jinja_is_the_one_used(sentencepiece_dir, tmp_path):
    """transformers saves a tokenizer's template to chat_template.jinja (preferred to tokenizer_config's): a
    from-hf tokenizer's must be rendered, not ChatML in its place."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(sentencepiece_dir))
    hf.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    hf.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    tok = load_tokenizer(tmp_path / "saved")
    messages = _llama_conversation()
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)


def test_a_template_renders_the_tokenizers_own_bos_and_eos(sentencepiece_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    shutil.copytree(sentencepiece_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA_TEMPLATE}))
    tok, hf = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    messages = _llama_conversation()
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST]") and " is grey </s>" in text
    ids = tok.encode(text)  # the markers are the special tokens, not their text spelt out in pieces
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 1


def test_sentencepiece_token_bytes_are_the_exact_bytes_of_each_token(sentencepiece_dir):
    """A byte-fallback piece <0xE4> is that one byte (not U+FFFD's three), and "▁" is a space wherever the
    token stands: the pieces' bytes join into the normalized text's (a space for each "▁")."""
    tok = load_tokenizer(sentencepiece_dir)
    text = "the cat is grey, 你好 🐱  two  spaces"
    ids = tok.encode(text)
    pieces = [tok.tokenizer.id_to_token(i) for i in ids]
    assert "<0xE4>" in pieces and "▁" in pieces[1:]  # byte fallback and a lone space piece both occur
    expected = tok.tokenizer.normalizer.normalize_str(text).replace("▁", " ").encode()
    assert b"".join(tok.token_bytes(i) for i in ids) == expected
    assert tok.token_bytes(tok.tokenizer.token_to_id("<0xE4>")) == b"\xe4"
    assert tok.token_bytes(tok.eos_token_id) == b"</s>"
