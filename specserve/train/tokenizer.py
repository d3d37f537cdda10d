"""Train the byte-level BPE tokenizer of a target on the train split of its corpora."""

from __future__ import annotations

from pathlib import Path

from specserve.models.tiny import save_tokenizer
from specserve.train.data import corpus_files, read_texts


def train_tokenizer(
    corpora: list[str | Path], vocab_size: int, out: str | Path, max_bytes: int = 8 << 20
) -> Path:
    """Byte-level BPE over at most `max_bytes` of each corpus's train split, saved in Hugging
    Face format with the ChatML template. Held-out files are never read."""
    texts: list[str] = []
    for corpus in corpora:
        files = corpus_files(corpus, "train")
        if not files:
            raise ValueError(f"{corpus}: no .py or .txt files in the train split")
        texts += read_texts(files, max_bytes)
    save_tokenizer(out, vocab_size, texts=texts)
    return Path(out)


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of a Hugging Face model or tokenizer folder."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(str(file))
