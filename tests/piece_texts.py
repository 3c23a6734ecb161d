"""Texts for the tests of encoding a long text in pieces (tokenizer and pipeline)."""

# Long runs of words, of whitespace, of non-ASCII, of special-token strings, of characters Python takes
# for whitespace and the tokenizer does not, and none of whitespace at all.
PIECE_TEXTS = {
    "words": " ".join(f"word{i % 37} and, it's {i}" for i in range(300)),
    "whitespace": "a" + " " * 300 + "b\t\t\n\n\n  c" + "\n" * 200 + " x  " * 50 + "   \r\n\f\v end  " + " " * 40,
    "non_ascii": "你好，世界。" * 50 + " " + " ".join(["naïve café 🙂 हिन्दी Ωμέγα"] * 40)
                 + "\u3000全角\u00a0nbsp\u2028x  \u3000 y",
    "special": " ".join(["<|im_start|>user\nhi<|im_end|>\n", "<|im_end|><|endoftext|> <|im_start|>"] * 60),
    "control": "!\x1c \x1d\x1e x\x1f! y" * 80,
    "no_whitespace": "nowhitespace,at;all/你好!" * 200,
}
