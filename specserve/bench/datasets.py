"""Benchmark prompts: random text, random token ids, JSONL files and ShareGPT files.

Every loader returns a list of `DatasetRow`. Lengths are drawn as in `sglang.bench_serving`:
uniform in [max(1, int(len * range_ratio)), len], so range_ratio 1.0 gives exact lengths.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file or option that cannot produce prompts."""


@dataclass(frozen=True)
class DatasetRow:
    prompt: str | list[int]  # text, or token ids (OpenAI completions accepts a list of ints)
    prompt_len: int  # tokens as the target tokenizer counts them; 0 when unknown
    output_len: int  # max_tokens to request


class Tokenizer:
    """The model's `tokenizer.json`, read with the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DatasetError(f"no tokenizer.json at {p}")
        self._tok = HFTokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        self._whole: list[int] | None = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def whole_char_ids(self) -> list[int]:
        """Ids that decode to whole characters and re-encode to themselves (computed once)."""
        if self._whole is None:
            ids = list(range(self.vocab_size))
            texts = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
            encs = self._tok.encode_batch(texts, add_special_tokens=False)
            self._whole = [
                i
                for i, t, e in zip(ids, texts, encs, strict=True)
                if t and "\ufffd" not in t and e.ids == [i]
            ]
            if not self._whole:
                raise DatasetError("the tokenizer has no token that round-trips through text")
        return self._whole

    def count(self, prompt: str | list[int]) -> int:
        """Prompt tokens as a server applying this tokenizer counts them (special tokens in)."""
        if isinstance(prompt, list):
            return len(prompt)
        return len(self.encode(prompt, add_special_tokens=True))


def draw_lengths(n: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    if length < 1:
        raise DatasetError(f"lengths must be at least 1, got {length}")
    if not 0.0 <= range_ratio <= 1.0:
        raise DatasetError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, length) for _ in range(n)]


def exact_length_text(tok: Tokenizer, length: int, rng: random.Random, tries: int = 50) -> str:
    """Text that re-encodes to exactly `length` tokens: decode random ids, re-encode, fix up.

    Ids are drawn from tokens that decode to whole characters, so the text is valid. Decoding
    then re-encoding can still merge or split tokens, so trim (never inside a character) or
    extend the re-encoded ids and go round again until the count is exact.
    """
    pool = tok.whole_char_ids()
    ids = [rng.choice(pool) for _ in range(length)]
    for _ in range(tries):
        enc = tok.encode(tok.decode(ids))
        if len(enc) == length:
            return tok.decode(enc)
        k = min(len(enc), length)
        while k > 0 and tok.decode(enc[:k]).endswith("\ufffd"):
            k -= 1
        ids = enc[:k] + [rng.choice(pool) for _ in range(length - k)]
    raise DatasetError(f"could not build a prompt of exactly {length} tokens in {tries} tries")


def sample_random(
    tok: Tokenizer,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: random.Random,
) -> list[DatasetRow]:
    """Text prompts of exactly the drawn length in the target tokenizer."""
    ins = draw_lengths(num, input_len, range_ratio, rng)
    outs = draw_lengths(num, output_len, range_ratio, rng)
    return [
        DatasetRow(exact_length_text(tok, i, rng), i, o) for i, o in zip(ins, outs, strict=True)
    ]


def sample_random_ids(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    rng: random.Random,
) -> list[DatasetRow]:
    """Token-id prompts, sent as a list of ints: exact lengths with no tokenizer round trip."""
    if vocab_size < 1:
        raise DatasetError(f"vocabulary size must be positive, got {vocab_size}")
    ins = draw_lengths(num, input_len, range_ratio, rng)
    outs = draw_lengths(num, output_len, range_ratio, rng)
    return [
        DatasetRow([rng.randrange(vocab_size) for _ in range(i)], i, o)
        for i, o in zip(ins, outs, strict=True)
    ]


def load_jsonl(
    path: str | Path, num: int, default_output_len: int, tok: Tokenizer | None
) -> list[DatasetRow]:
    """One {"prompt": text or ids, "output_len": n} per line; output_len defaults to the flag."""
    rows = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt = obj["prompt"]
            out = int(obj.get("output_len", default_output_len))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetError(
                f"{path}:{lineno}: expected {{'prompt': ..., 'output_len': n}}: {e}"
            ) from None
        if not isinstance(prompt, str | list) or out < 1:
            raise DatasetError(f"{path}:{lineno}: prompt must be text or ids, output_len >= 1")
        rows.append(DatasetRow(prompt, tok.count(prompt) if tok else _known_len(prompt), out))
        if len(rows) == num:
            break
    return _enough(rows, num, path)


def load_sharegpt(
    path: str | Path,
    num: int,
    tok: Tokenizer | None,
    output_len: int | None,
    rng: random.Random,
) -> list[DatasetRow]:
    """ShareGPT JSON: first human turn is the prompt; the reply's length is the output length,
    unless `output_len` fixes it. Pairs with prompt or reply under 4 tokens are skipped."""
    if tok is None and output_len is None:
        raise DatasetError("sharegpt needs --tokenizer, or --sharegpt-output-len to fix lengths")
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not JSON: {e}") from None
    pairs = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and all(isinstance(t, dict) and "value" in t for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    rng.shuffle(pairs)
    rows = []
    for prompt, reply in pairs:
        prompt_len = tok.count(prompt) if tok else 0
        out = output_len if output_len is not None else len(tok.encode(reply))
        if (tok and prompt_len < 4) or out < 4:
            continue
        rows.append(DatasetRow(prompt, prompt_len, out))
        if len(rows) == num:
            break
    return _enough(rows, num, path)


def domains_in_turn(path: str | Path, length: int | None = None) -> list[list[int]]:
    """`token_ids` of a prompts file with a `domain` field (the demo bundle's held-out prompts),
    the domains taken in turn (code, prose, code, ...), so any first N mix them evenly. With
    `length`, prompts shorter than that are dropped and the rest cut to their first `length`
    tokens (long-context workloads: one whole file per prompt, never snippets joined)."""
    by_domain: dict[str, list[list[int]]] = {}
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ids = list(item["token_ids"])
            domain = str(item.get("domain", ""))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DatasetError(f"{path}:{n}: expected a JSON object with 'token_ids'") from None
        if length is None or len(ids) >= length:
            by_domain.setdefault(domain, []).append(ids[:length])
    groups = list(by_domain.values())
    longest = max(map(len, groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path}: {e.strerror}") from None


def _known_len(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else 0


def _enough(rows: list[DatasetRow], num: int, path: str | Path) -> list[DatasetRow]:
    if not rows:
        raise DatasetError(f"{path} has no usable prompts")
    if len(rows) < num:
        raise DatasetError(f"{path} has {len(rows)} usable prompts, --num-prompts asks {num}")
    return rows
