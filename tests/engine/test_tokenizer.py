"""Tokenizer: loading, round trips, the chat template, incremental detokenization."""

from __future__ import annotations

import pytest

from specserve.config import ConfigError
from specserve.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer
from specserve.train.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_path) -> Tokenizer:
    return Tokenizer(tiny_model_path)


def test_round_trip_and_special_tokens(tok):
    text = "def f(x):\n    return x + 1  # ünïcödé ✓"
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id is not None
    assert tok.decode([tok.eos_token_id]) == ""  # special tokens skipped by default
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|im_end|>"


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_template_errors_are_chat_template_errors(tmp_path):
    save_tokenizer(tmp_path / "none", 300, chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(tmp_path / "none").apply_chat_template([{"role": "user", "content": "x"}])
    save_tokenizer(tmp_path / "raises", 300, chat_template="{{ raise_exception('no system') }}")
    with pytest.raises(ChatTemplateError, match="no system"):
        Tokenizer(tmp_path / "raises").apply_chat_template([{"role": "user", "content": "x"}])
    # the sandbox refuses attribute access to Python internals
    save_tokenizer(tmp_path / "escape", 300, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        Tokenizer(tmp_path / "escape").apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_incremental_detokenizer_streams_the_same_text(tok):
    text = "Ünïcödé ✓ and emoji 🙂 in a stream of text."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == text == detok.text
    assert "\ufffd" not in "".join(deltas)  # partial UTF-8 sequences are held back
