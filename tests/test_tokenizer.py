"""The offline GPT-2 tokenizer against hand-checked ids and independent constructions."""

from __future__ import annotations

import pytest

from gpt2jax.errors import UserError

# Ids checked by hand against OpenAI's GPT-2 encoder.json (stable since 2019).
KNOWN = {
    "Hello world": [15496, 995],
    "<|endoftext|>": [50256],
    "Hello world<|endoftext|>": [15496, 995, 50256],
    " the\n": [262, 198],
    "你好": [19526, 254, 25001, 121],
    "😀": [47249, 222],
}
TEXTS = [
    *KNOWN,
    "The quick brown fox jumps over the lazy dog.  Twice!\n\tTabs, CAPS and numbers 12345.",
    "机器学习是人工智能的一个分支。",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "mixed: café naïve — “quotes” <|endoftext|> after",
    "",
]


@pytest.fixture(scope="module")
def tok():
    from gpt2jax.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def test_known_ids(tok):
    for text, ids in KNOWN.items():
        assert tok(text)["input_ids"] == ids, text
    assert tok.eos_token_id == 50256 and len(tok) == 50257
    assert tok.decode(KNOWN["你好"]) == "你好"


def test_equals_independent_byte_level_bpe(tok):
    """tokenizers' ByteLevelBPETokenizer on the same two files: a separate code path."""
    from tokenizers import ByteLevelBPETokenizer

    from gpt2jax.tokenizer import _bpe_files

    encoder, merges = _bpe_files()
    ref = ByteLevelBPETokenizer(str(encoder), str(merges))
    ref.add_special_tokens(["<|endoftext|>"])
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref.encode(text).ids, text


def test_saved_tokenizer_reloads_identically(tok, tmp_path):
    from transformers import GPT2TokenizerFast

    from gpt2jax.tokenizer import load_tokenizer

    tok.save_pretrained(str(tmp_path))
    for reloaded in (GPT2TokenizerFast.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        for text in TEXTS:
            assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text
    # a directory without tokenizer files falls back to the offline GPT-2 tokenizer
    assert load_tokenizer(tmp_path / "nothing_here") is tok


def test_a_saved_gpt2_tokenizer_loads_without_importing_torch(tok, tmp_path):
    """transformers' AutoTokenizer imports torch when it is installed (seconds of every
    command's start-up); a saved GPT-2 tokenizer loads as the same class without it, and
    encodes as AutoTokenizer's does."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from gpt2jax.tokenizer import load_tokenizer

    tok.save_pretrained(str(tmp_path))
    code = ("import sys; from gpt2jax.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(tmp_path)!r}); "
            "print(type(t).__name__, t.eos_token_id, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert out == [type(auto).__name__, "50256", "False"]
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"], text


def test_changed_bpe_file_is_refused(monkeypatch):
    from gpt2jax import tokenizer

    monkeypatch.setitem(tokenizer._SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(UserError, match="SHA-256"):
        tokenizer._bpe_files()
