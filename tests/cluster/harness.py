"""Helpers for the cluster tests: free ports, waiting, a throwaway PostgreSQL, cluster processes."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from specserve.ports import free_port, free_port_range

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVER = Path(__file__).with_name("fake_openai_server.py")
PASSWORD = "test-password"
TOKEN = "test-token"


def require(ok: bool, reason: str) -> None:
    """Skip locally when a system dependency is missing, but fail under CI=true."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: run scripts/install-test-deps.sh)")
    pytest.skip(reason)


def free_range(n: int) -> tuple[int, int]:
    """`n` consecutive free loopback ports."""
    return free_port_range(n)


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (httpx.HTTPError, KeyError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# ----------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL on a free loopback port; yields an admin URL (db `postgres`)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    require(bool(bins), "PostgreSQL server binaries not installed")
    require(shutil.which("runuser") is not None and _has_user("postgres"), "no postgres user")
    bindir = Path(bins[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="specserve-pg-"))
    os.chmod(base, 0o777)
    data, port = base / "data", free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                    str(base / "log"), "-w", "-t", "60", "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def fresh_postgres_db(admin_url: str) -> str:
    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + "/" + name


# ----------------------------------------------------------------------------- processes


class Proc:
    """A `specserve cluster ...` subprocess with its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.out = open(log, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "specserve", "cluster", *args],
                                  cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.out.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class Cluster:
    """A server with an embedded worker, plus extra workers, on loopback."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.api = httpx.Client(base_url=self.url, auth=("admin", PASSWORD), timeout=30)

    def timing(self) -> list[str]:
        return ["--heartbeat-interval", "0.4", "--restart-backoff", "0.3"]

    def start_server(self, name: str = "w1", extra: list[str] = ()) -> Proc:
        lo, hi = free_range(4)
        args = ["start", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
                str(self.tmp / "server"), "--bootstrap-password", PASSWORD, "--token", TOKEN,
                "--heartbeat-timeout", "2.5", "--schedule-interval", "0.3", "--enable-worker",
                "--worker-name", name, "--worker-ip", "127.0.0.1", "--worker-port",
                str(free_port()), "--service-port-range", f"{lo}-{hi}", *self.timing(), *extra]  # fmt: skip
        proc = self._spawn(args, "server.log")
        wait_for(lambda: self.api.get("/healthz").status_code == 200, 30, "server health")
        return proc

    def start_worker(self, name: str, extra: list[str] = ()) -> Proc:
        lo, hi = free_range(4)
        args = ["worker", "--server-url", self.url, "--token", TOKEN, "--worker-name", name,
                "--worker-ip", "127.0.0.1", "--worker-port", str(free_port()),
                "--service-port-range", f"{lo}-{hi}", "--data-dir", str(self.tmp / name),
                *self.timing(), *extra]  # fmt: skip
        return self._spawn(args, f"{name}.log")

    def _spawn(self, args: list[str], log: str) -> Proc:
        proc = Proc(args, self.tmp / log)
        self.procs.append(proc)
        return proc

    def workers_ready(self, n: int) -> list[dict]:
        def ready() -> list[dict] | None:
            ws = [w for w in items(self.api.get("/v2/workers")) if w["state"] == "ready"]
            return ws if len(ws) >= n else None

        return wait_for(ready, 30, f"{n} ready workers")

    def instances(self, model: str) -> list[dict]:
        return items(self.api.get("/v2/model-instances", params={"model": model}))

    def wait_running(self, model: str, n: int, timeout: float = 40.0) -> list[dict]:
        def running() -> list[dict] | None:
            insts = self.instances(model)
            ok = [i for i in insts if i["state"] == "running"]
            return ok if len(ok) >= n and len(insts) == n else None

        try:
            return wait_for(running, timeout, f"{n} running instances of {model}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.instances(model)}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.api.close()


def items(response: httpx.Response) -> list[dict]:
    """The rows of a GPUStack-style paginated list response."""
    assert response.status_code == 200, response.text
    return response.json()["items"]


def fake_backend(name: str = "fake") -> dict:
    """A custom backend in the exact shape of the seed's `dspark` SGLang definition."""
    return {
        "name": name,
        "entrypoint": f"{sys.executable} {FAKE_SERVER}",
        "command": "--model-path {{model_path}} --host {{worker_ip}} --port {{port}}",
        "framework": "cpu",
    }
