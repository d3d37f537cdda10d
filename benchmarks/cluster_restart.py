"""Restart time through the cluster: SIGKILL an instance's process -> it serves again.

    .venv/bin/python benchmarks/cluster_restart.py [--algorithm DSPARK] [--kills 2]

Starts `specserve cluster start --enable-worker` on loopback, deploys the demo bundle's
target (built-in `specserve` backend, the drafter as backend parameters), waits until it
serves through the gateway, then kills its process `--kills` times. For each kill it prints
the seconds until the worker reports `running` again and until a chat request through the
gateway succeeds. The worker notices a dead process at its next heartbeat
(`--heartbeat-interval`) and restarts it after `--restart-backoff`; both are printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BUNDLE = Path("models/demo")
PASSWORD = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if out := pred():
                return out
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def backend_parameters(algorithm: str) -> str:
    params = "--served-model-name demo --max-total-tokens 32768"
    if algorithm == "DSPARK":
        drafter = BUNDLE / "dspark"
        params += f" --speculative-algorithm DSPARK --speculative-draft-model-path {drafter}"
        if (drafter / "sts.json").is_file():
            params += f" --speculative-dspark-confidence-sts-path {drafter / 'sts.json'}"
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", choices=["NONE", "DSPARK"], default="DSPARK")
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--restart-backoff", type=float, default=1.0)
    args = ap.parse_args()

    port, data = free_port(), Path(tempfile.mkdtemp(prefix="cluster-restart-"))
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "specserve", "cluster", "start", "--port", str(port),
           "--data-dir", str(data), "--bootstrap-password", PASSWORD, "--enable-worker",
           "--worker-port", str(free_port()), "--heartbeat-interval",
           str(args.heartbeat_interval), "--restart-backoff", str(args.restart_backoff)]  # fmt: skip
    log = open(data / "cluster.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=url, auth=("admin", PASSWORD), timeout=30)
    try:
        wait(lambda: api.get("/healthz").status_code == 200, 60, "the cluster server")
        body = {"name": "demo", "local_path": str((BUNDLE / "target").resolve()),
                "backend_parameters": backend_parameters(args.algorithm)}  # fmt: skip
        api.post("/v2/models", json=body).raise_for_status()
        key = api.post("/v2/api-keys", json={"name": "bench"}).json()["value"]
        chat = {"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

        def serves() -> bool:
            r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60,
                           headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            return r.status_code == 200

        def instance() -> dict | None:
            insts = api.get("/v2/model-instances").json()["items"]
            return insts[0] if insts and insts[0]["state"] == "running" else None

        t0 = time.monotonic()
        inst = wait(instance, 600, "the first start")
        wait(serves, 60, "the first answer")
        print(f"{args.algorithm}: first start (deploy -> serving) {time.monotonic() - t0:.1f} s")
        for k in range(args.kills):
            t0 = time.monotonic()
            os.kill(inst["pid"], signal.SIGKILL)
            old = inst["pid"]
            inst = wait(lambda old=old: (i := instance()) and i["pid"] != old and i, 600, "running")
            t_running = time.monotonic() - t0
            wait(serves, 60, "an answer")
            print(f"kill {k + 1}: running after {t_running:.1f} s, serving through the gateway "
                  f"after {time.monotonic() - t0:.1f} s")  # fmt: skip
        print(f"(heartbeat interval {args.heartbeat_interval:g} s, restart backoff "
              f"{args.restart_backoff:g} s)")  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()


if __name__ == "__main__":
    main()
