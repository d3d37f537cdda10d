"""Training text: the two demo domains, the train/held-out split, tokenization and packing.

A corpus is a folder of text files; its name is its domain (`code`, `prose`). Files are split
deterministically by a hash of their path inside the corpus, so the held-out files never reach
the tokenizer, the target or a drafter. `export_corpus` builds both demo domains from what ships
on the machine: the CPython standard library (code) and the English man pages (prose).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

HELDOUT_PERCENT = 5
TEXT_SUFFIXES = (".py", ".txt")


def is_heldout(relpath: str) -> bool:
    """Whether a file (path relative to its corpus folder) belongs to the held-out split."""
    digest = hashlib.sha1(relpath.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def corpus_files(corpus: str | Path, split: str) -> list[Path]:
    """Text files of one split ('train' or 'heldout') of a corpus folder, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = Path(corpus)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    want_heldout = split == "heldout"
    return [p for p in files if is_heldout(p.relative_to(root).as_posix()) == want_heldout]


def read_texts(files: list[Path], max_bytes: int | None = None) -> list[str]:
    """The files' contents (undecodable bytes replaced), stopping once `max_bytes` are read."""
    texts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return texts


def tokenize(texts: list[str], tokenizer, eos_id: int) -> torch.Tensor:
    """One long int32 stream: the documents' tokens, each followed by `eos_id`."""
    chunks = []
    for enc in tokenizer.encode_batch(texts):
        chunks.append(torch.tensor(enc.ids + [eos_id], dtype=torch.int32))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into [n, seq_len] rows (the ragged tail is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


# --- the demo corpus ----------------------------------------------------------------------------

_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_ESCAPES = [
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\\(em|\\\(en"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\[&/,|^%:)]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\\*\(?..?"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"}


def roff_to_text(src: str) -> str:
    """A man page's source as plain text: macros dropped, section titles and inline fonts kept."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name not in _TEXT_MACROS or not rest:
                if name in ("PP", "P", "LP", "sp", "SH", "SS"):
                    out.append("")
                continue
            line = rest.replace('"', "")
        line = _ROFF_FONT.sub("", line)
        for pat, rep in _ROFF_ESCAPES:
            line = pat.sub(rep, line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel:
            continue
        yield rel, p.read_text(encoding="utf-8", errors="replace")


def _man_sources(man_root: Path) -> Iterator[tuple[str, str]]:
    for section in ("man1", "man5", "man7", "man8"):  # English pages only (no locale folders)
        for p in sorted((man_root / section).glob("*.gz")):
            try:
                src = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            # Skip links to other pages and the thousands of near-identical gcloud pages.
            if src.lstrip().startswith(".so ") or p.name.startswith("gcloud"):
                continue
            text = roff_to_text(src)
            if len(text) > 400:
                yield f"{section}/{p.name.removesuffix('.gz')}.txt", text


def heldout_documents(
    man_root: str | Path = "/usr/share/man",
) -> Iterator[tuple[str, str, str]]:
    """(domain, path, text) of the demo corpus's held-out files, read from the machine (the same
    sources and path hash as `export_corpus`), code first: long-context prompts for a bundle
    that ships none."""
    for domain, sources in (("code", _stdlib_sources()), ("prose", _man_sources(Path(man_root)))):
        for rel, text in sources:
            if is_heldout(rel):
                yield domain, rel, text


def export_corpus(
    out: str | Path, max_bytes: int = 32 << 20, man_root: str | Path = "/usr/share/man"
) -> dict[str, int]:
    """Write `out/code` (stdlib .py files) and `out/prose` (man pages as text); returns bytes
    written per domain. Each domain is capped at `max_bytes`; files keep their relative path."""
    out = Path(out)
    written = {}
    for domain, sources in (
        ("code", _stdlib_sources()),
        ("prose", _man_sources(Path(man_root))),
    ):
        total = 0
        for rel, text in sources:
            dest = out / domain / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            total += len(text.encode())
            if total >= max_bytes:
                break
        written[domain] = total
    return written
