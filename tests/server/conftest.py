from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
from specserve.engine.engine import LLMEngine
from specserve.ports import free_port
from specserve.server.api import ServerConfig, create_app
from specserve.server.async_engine import AsyncEngine
from specserve.speculative.factory import build_speculation


class RunningServer:
    def __init__(
        self,
        model_path: str,
        api_key: str | None = None,
        scheduler: SchedulerConfig | None = None,
        server: ServerConfig | None = None,
        spec: SpecConfig | None = None,
        tool_call_parser: str | None = "hermes",
        **cache,
    ) -> None:
        config = EngineConfig(
            model_path=model_path,
            cache=CacheConfig(**cache),
            scheduler=scheduler or SchedulerConfig(),
        )
        llm_engine = LLMEngine(config)
        if spec is not None:
            llm_engine.set_speculation(*build_speculation(spec, llm_engine))
        self.engine = AsyncEngine(llm_engine)
        self.engine.start()
        algorithm = spec.algorithm if spec else "NONE"
        self.app = create_app(
            self.engine,
            server or ServerConfig("tiny", api_key, algorithm, tool_call_parser=tool_call_parser),
        )
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has no requests left (aborts are processed asynchronously)."""
        deadline = time.time() + timeout
        eng = self.engine.engine
        while eng.has_unfinished() or eng.streams:
            assert time.time() < deadline, "engine did not become idle"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_model_path):
    s = RunningServer(tiny_model_path, max_total_tokens=8192, page_size=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tiny_model_path):
    """A server with an API key and a route that fails with an internal error."""
    s = RunningServer(tiny_model_path, api_key="sekrit", max_total_tokens=1024)

    async def boom() -> None:
        raise RuntimeError("secret internals")

    s.app.add_api_route("/boom", boom)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    server.wait_idle()
    bm = server.engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"


@pytest.fixture
def start_server():
    """Factory for extra servers in one test; all are stopped at the end."""
    started: list[RunningServer] = []

    def start(model_path: str, **kwargs) -> RunningServer:
        s = RunningServer(model_path, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def start_module_server():
    """Like start_server, for servers shared by the tests of one module."""
    started: list[RunningServer] = []

    def start(model_path: str, **kwargs) -> RunningServer:
        s = RunningServer(model_path, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
