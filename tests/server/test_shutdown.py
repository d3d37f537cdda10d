"""Graceful shutdown on SIGTERM, and a non-zero exit when the engine loop dies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from specserve.config import CacheConfig, EngineConfig
from specserve.engine.engine import LLMEngine
from specserve.ports import free_port
from specserve.server.api import ServerConfig, create_app
from specserve.server.async_engine import AsyncEngine
from specserve.server.lifecycle import serve


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


class _Stream(threading.Thread):
    """Reads one streamed completion to its end, keeping every SSE data line."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        body = {"prompt": "a story", "max_tokens": self.max_tokens, "ignore_eos": True}
        with httpx.stream(
            "POST", self.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started.set()


def test_sigterm_with_live_streams_exits_in_time(tiny_model_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "specserve", "serve", "--model-path", tiny_model_path]
    cmd += ["--port", str(port), "--max-total-tokens", "8192", "--shutdown-timeout", "2"]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_healthy(url, proc)
        long, short = _Stream(url, 2000), _Stream(url, 30)
        long.start()
        assert long.started.wait(30)
        short.start()
        assert short.started.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stdout.read()
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert elapsed < 2 + 8  # the drain timeout plus start-up of the abort and exit
    long.join(5)
    short.join(5)
    # the short one finished normally; the long one was cut with a final error event
    assert json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length"
    assert short.events[-1] == "[DONE]"
    error = json.loads(long.events[-2])["error"]
    assert "shutting down" in error["message"] and error["code"] == "service_unavailable"
    assert long.events[-1] == "[DONE]"


def test_serve_exits_nonzero_when_the_engine_loop_dies(tiny_model_path):
    config = EngineConfig(model_path=tiny_model_path, cache=CacheConfig(max_total_tokens=1024))
    engine = AsyncEngine(LLMEngine(config))
    app = create_app(engine, ServerConfig("tiny"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seen: list[int] = []

    def break_the_loop() -> None:
        _wait_healthy(url, timeout=30)

        def broken() -> bool:
            raise RuntimeError("loop bug")

        engine.engine.has_unfinished = broken
        seen.append(httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code)

    helper = threading.Thread(target=break_the_loop, daemon=True)
    helper.start()
    t0 = time.monotonic()
    code = serve(engine, app, "127.0.0.1", port, "warning", shutdown_timeout=1)
    assert code == 1 and time.monotonic() - t0 < 60
    helper.join(5)
    assert seen == [503]
