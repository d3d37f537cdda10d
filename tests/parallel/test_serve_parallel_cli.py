"""`specserve serve --tp-size 2 --ep-size 2` starts its second rank itself and serves HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil

from specserve.config import CacheConfig, EngineConfig
from specserve.core import SamplingParams
from specserve.engine.engine import LLMEngine
from specserve.ports import free_port


def _lingering(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_serve_tp2_ep2_mxfp4_over_http(tiny_moe_tp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "specserve", "serve", "--model-path", tiny_moe_tp_path,
           "--port", str(port), "--max-total-tokens", "1024", "--page-size", "8",
           "--tp-size", "2", "--ep-size", "2", "--moe-runner-backend", "flashinfer_mxfp4",
           "--speculative-algorithm", "NGRAM", "--dist-timeout", "60", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        ranks = psutil.Process(server.pid).children(recursive=True)
        assert len([p for p in ranks if "python" in p.name().lower()]) >= 1  # rank 1
        body = {"prompt": [5, 17, 300, 42], "max_tokens": 16, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    # Rank 1 exits on its own once rank 0 is gone; on a loaded machine that can take a moment.
    _, alive = psutil.wait_procs(ranks, timeout=20)
    assert not [p for p in alive if _lingering(p)]
    cfg = EngineConfig(tiny_moe_tp_path, cache=CacheConfig(page_size=8, max_total_tokens=1024))
    engine = LLMEngine(cfg, moe_backend="mxfp4")
    req = engine.add_request([5, 17, 300, 42], SamplingParams(max_tokens=16, temperature=0,
                                                              ignore_eos=True))  # fmt: skip
    while engine.has_unfinished():
        engine.step()
    assert got["choices"][0]["text"] == engine.tokenizer.decode(req.output_token_ids)
    assert got["usage"]["completion_tokens"] == 16
