from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from specserve.bench.compare import ServerProcess, free_port
from specserve.bench.server_stats import parse_prometheus

FAKE_SERVER = Path(__file__).with_name("fake_server.py")


def fake_server_argv(*args: str) -> list[str]:
    return [sys.executable, str(FAKE_SERVER), *args]


class FakeServer:
    def __init__(self, url: str):
        self.url = url

    def counters(self) -> dict[str, float]:
        """Every /metrics sample, summed over label sets, by name."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for name, _labels, value in parse_prometheus(text):
            out[name] = out.get(name, 0.0) + value
        return out


@pytest.fixture(scope="module")
def start_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., FakeServer]]:
    """start_fake(*args) -> a running fake server, stopped at the end of the module."""
    servers: list[ServerProcess] = []

    def start(*args: str) -> FakeServer:
        port = free_port()
        log = tmp_path_factory.mktemp("fake") / "server.log"
        server = ServerProcess(
            fake_server_argv("--port", str(port), *args), log, f"http://127.0.0.1:{port}"
        )
        servers.append(server)
        server.start()
        server.wait_healthy(30)
        return FakeServer(server.base_url)

    yield start
    for s in servers:
        s.stop(5)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer.json, trained here (merges make round trips inexact)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [
        f"the quick brown fox {i} jumps over the lazy speculative decoder" for i in range(200)
    ]
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return d
